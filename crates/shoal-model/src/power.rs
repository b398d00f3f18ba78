//! Host power: how a host's draw follows its CPU utilisation, how the controller switches it off
//! and on, what it has used, and what the consolidator plans.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Power draw in W at evenly spaced CPU utilisations from 0 % to 100 % (two points: idle and full
/// load; eleven: the SPECpower steps of 10 %), linear in between.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PowerModel {
    pub watts: Vec<f64>,
}

impl Default for PowerModel {
    /// A generic two-socket server: 120 W idle, 300 W at full load.
    fn default() -> Self {
        PowerModel {
            watts: vec![120.0, 300.0],
        }
    }
}

impl PowerModel {
    /// Draw at utilisation `u` (clamped to 0..=1).
    pub fn at(&self, u: f64) -> f64 {
        let n = self.watts.len();
        if n == 1 {
            return self.watts[0];
        }
        let x = u.clamp(0.0, 1.0) * (n - 1) as f64;
        let i = (x.floor() as usize).min(n - 2);
        self.watts[i] + (self.watts[i + 1] - self.watts[i]) * (x - i as f64)
    }

    pub fn validate(&self) -> Result<(), PowerModelError> {
        if self.watts.len() < 2 {
            return Err(PowerModelError::TooFewPoints(self.watts.clone()));
        }
        if let Some(w) = self.watts.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(PowerModelError::BadPoint(*w));
        }
        if self.watts.windows(2).any(|p| p[1] < p[0]) {
            return Err(PowerModelError::Decreasing(self.watts.clone()));
        }
        Ok(())
    }
}

/// Why a power model is refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PowerModelError {
    #[error("a power model needs at least two points (idle and full load), got {0:?}")]
    TooFewPoints(Vec<f64>),
    #[error("power model point {0} W is not a non-negative number")]
    BadPoint(f64),
    #[error("power model {0:?} W must not decrease with load")]
    Decreasing(Vec<f64>),
    #[error("power model {model:?}: {point:?} is not a number of watts")]
    NotANumber { model: String, point: String },
}

impl std::str::FromStr for PowerModel {
    type Err = PowerModelError;
    /// `120,300` or eleven comma-separated watts.
    fn from_str(s: &str) -> Result<Self, PowerModelError> {
        let watts = s
            .split(',')
            .map(|w| {
                w.trim().parse::<f64>().map_err(|_| PowerModelError::NotANumber {
                    model: s.to_string(),
                    point: w.to_string(),
                })
            })
            .collect::<Result<Vec<f64>, PowerModelError>>()?;
        let m = PowerModel { watts };
        m.validate()?;
        Ok(m)
    }
}

/// Whether a host is switched on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    #[default]
    On,
    /// Switched on, not heard from since.
    Booting,
    Off,
}

impl PowerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PowerState::On => "on",
            PowerState::Booting => "booting",
            PowerState::Off => "off",
        }
    }
}

/// A host's power configuration: its model and the commands that switch it (run by the
/// controller with `sh -c`, `$SHOAL_HOST` set to the host's name; e.g. an `ipmitool chassis
/// power on` or a wake-on-LAN command line).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostPowerConfig {
    #[serde(default)]
    pub model: PowerModel,
    #[serde(default)]
    pub power_on_command: Option<String>,
    #[serde(default)]
    pub power_off_command: Option<String>,
}

/// A host's power configuration and state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostPower {
    pub host: String,
    #[serde(flatten)]
    pub config: HostPowerConfig,
    pub state: PowerState,
    pub since_unix_ms: u64,
    /// The last power command's failure, if it failed.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What a host draws and has used since the controller started accounting for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostEnergy {
    pub host: String,
    pub state: PowerState,
    /// CPU utilisation over the last sample: the VMs' CPU time / the host's cores.
    pub cpu_util: f64,
    pub power_w: f64,
    pub energy_kwh: f64,
    pub since_unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnergyReport {
    pub hosts: Vec<HostEnergy>,
    pub power_w: f64,
    pub energy_kwh: f64,
}

/// One live migration of a consolidation plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlannedMove {
    pub vm: String,
    pub from: String,
    pub to: String,
}

/// What the consolidator would do now (or did, when applied).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConsolidationPlan {
    pub power_on: Vec<String>,
    pub moves: Vec<PlannedMove>,
    pub power_off: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_interpolate_and_bad_ones_are_named() {
        let m: PowerModel = "100,200".parse().unwrap();
        assert_eq!(m.at(0.0), 100.0);
        assert_eq!(m.at(0.25), 125.0);
        assert_eq!(m.at(2.0), 200.0);
        let g4: PowerModel = "86,89.4,92.6,96,99.5,102,106,108,112,114,117".parse().unwrap();
        assert!((g4.at(0.95) - 115.5).abs() < 1e-9);
        assert!("100"
            .parse::<PowerModel>()
            .unwrap_err()
            .to_string()
            .contains("two points"));
        assert!("100,x".parse::<PowerModel>().unwrap_err().to_string().contains("\"x\""));
        assert!("200,100"
            .parse::<PowerModel>()
            .unwrap_err()
            .to_string()
            .contains("decrease"));
    }
}
