//! The simulated infrastructure and workload: host types with their power curves, VM types, and a
//! day of per-VM CPU samples. Numbers follow the PlanetLab reference model (`MODEL.md` beside the
//! traces), which is CloudSim's `power.planetlab` setup.

use std::path::{Path, PathBuf};

/// Migration bandwidth: half of a 1 Gbit/s link, in MB/s (the other half carries the VMs' traffic).
pub const MIGRATION_MB_PER_S: f64 = 1_000_000.0 / (2.0 * 8000.0);

#[derive(Debug, Clone, PartialEq)]
pub struct HostType {
    pub name: &'static str,
    pub cores: u32,
    pub mips_per_core: f64,
    pub ram_mb: u32,
    /// Power draw in W at 0 %, 10 %, …, 100 % CPU; linear in between.
    pub power_w: [f64; 11],
}

impl HostType {
    pub fn mips(&self) -> f64 {
        self.cores as f64 * self.mips_per_core
    }

    /// Power at utilisation `u` (0..=1; clamped), linear between the measured points.
    pub fn power(&self, u: f64) -> f64 {
        let u = u.clamp(0.0, 1.0);
        let x = u * 10.0;
        let i = (x.floor() as usize).min(9);
        let f = x - i as f64;
        self.power_w[i] + (self.power_w[i + 1] - self.power_w[i]) * f
    }
}

/// HP ProLiant ML110 G4 and G5, the two host types of the reference model.
pub fn planetlab_host_types() -> Vec<HostType> {
    vec![
        HostType {
            name: "G4",
            cores: 2,
            mips_per_core: 1860.0,
            ram_mb: 4096,
            power_w: [86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0],
        },
        HostType {
            name: "G5",
            cores: 2,
            mips_per_core: 2660.0,
            ram_mb: 4096,
            power_w: [
                93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
            ],
        },
    ]
}

/// (MIPS, RAM MB) of the four one-vCPU VM types of the reference model.
pub const PLANETLAB_VM_TYPES: [(f64, u32); 4] = [(2500.0, 870), (2000.0, 1740), (1000.0, 1740), (500.0, 613)];

#[derive(Debug, Clone, PartialEq)]
pub struct VmSpec {
    pub name: String,
    pub vm_type: u32,
    pub mips: f64,
    pub ram_mb: u32,
    /// CPU demand as a fraction of `mips`, one sample per interval, plus one repeat of the last
    /// sample so that an instant at the very end of the day can still interpolate.
    pub samples: Vec<f64>,
}

impl VmSpec {
    /// Demand fraction at time `t` seconds: the sample at an interval boundary, linear in between.
    pub fn demand_fraction(&self, t: f64, interval_s: f64) -> f64 {
        let x = t / interval_s;
        let last = self.samples.len() - 1;
        let i = (x.floor() as usize).min(last);
        let f = x - i as f64;
        if f <= 0.0 || i == last {
            return self.samples[i];
        }
        self.samples[i] + (self.samples[i + 1] - self.samples[i]) * f
    }

    pub fn migration_s(&self) -> f64 {
        self.ram_mb as f64 / MIGRATION_MB_PER_S
    }
}

/// A day (or any span) of VMs with their demand, and the hosts to run them on.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    pub vms: Vec<VmSpec>,
    pub host_types: Vec<HostType>,
    /// Host i is of type `host_type_of[i]`.
    pub host_type_of: Vec<usize>,
    pub interval_s: f64,
    /// Samples per VM (288 for a PlanetLab day); see `decisions` for the instants.
    pub steps: usize,
    /// The reference toolkit's behaviour that moves its numbers: decision instants fall 0.1 s
    /// after each sample boundary (demand is interpolated there), and a VM whose demand reads
    /// exactly 0 at an update instant is treated as finished and leaves for the rest of the day.
    /// Off, every VM runs the whole day and instants fall on the sample boundaries.
    pub reference_quirks: bool,
}

impl Workload {
    pub fn hosts(&self) -> usize {
        self.host_type_of.len()
    }

    /// Decision instants after t = 0. The reference's last instant is 0.1 s after the last
    /// sample's start, one interval before the end of the day: its energy covers 286 intervals
    /// (DVFS, which never migrates, pins this: 287 would give 767.5 kWh against 764.96).
    pub fn decisions(&self) -> usize {
        if self.reference_quirks {
            self.steps - 1
        } else {
            self.steps
        }
    }

    /// The same day on `n` hosts, alternating types as in the reference model.
    pub fn with_hosts(mut self, n: usize) -> Self {
        let k = self.host_types.len();
        self.host_type_of = (0..n).map(|i| i % k).collect();
        self
    }

    /// Keeps only the VMs whose index satisfies `keep` (for hold-out checks), in order.
    pub fn subset(mut self, keep: impl Fn(usize) -> bool) -> Self {
        self.vms = self
            .vms
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, v)| v)
            .collect();
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: {text:?} is not a CPU percentage")]
    Sample { path: PathBuf, line: usize, text: String },
    #[error("{path}: {found} samples, expected {expected} like the other traces")]
    Length {
        path: PathBuf,
        found: usize,
        expected: usize,
    },
    #[error("{path} line {line}: bad VM order row {text:?}")]
    Order { path: PathBuf, line: usize, text: String },
    #[error("{0}: no trace files")]
    Empty(PathBuf),
}

fn read(path: &Path) -> Result<String, TraceError> {
    std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.to_owned(),
        source,
    })
}

fn parse_samples(path: &Path) -> Result<Vec<f64>, TraceError> {
    let text = read(path)?;
    let mut out = Vec::with_capacity(289);
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        let v: f64 = l.parse().map_err(|_| TraceError::Sample {
            path: path.to_owned(),
            line: i + 1,
            text: l.to_owned(),
        })?;
        if !(0.0..=100.0).contains(&v) {
            return Err(TraceError::Sample {
                path: path.to_owned(),
                line: i + 1,
                text: l.to_owned(),
            });
        }
        out.push(v / 100.0);
    }
    Ok(out)
}

/// Loads a PlanetLab day: one file of CPU percentages per VM. The VM order (and so each VM's type)
/// comes from `<dir>.vm-order.csv` beside the directory when present (the order the reference run
/// used), else from sorted file names with VM i of type floor(i / ceil(N/4)).
pub fn load_planetlab(dir: &Path, hosts: usize) -> Result<Workload, TraceError> {
    let order_path = {
        let mut p = dir.as_os_str().to_owned();
        p.push(".vm-order.csv");
        PathBuf::from(p)
    };
    let mut rows: Vec<(String, Option<u32>)> = Vec::new();
    if order_path.is_file() {
        let text = read(&order_path)?;
        for (i, l) in text.lines().enumerate().skip(1) {
            if l.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = l.split(',').collect();
            let bad = || TraceError::Order {
                path: order_path.clone(),
                line: i + 1,
                text: l.to_owned(),
            };
            if f.len() < 5 {
                return Err(bad());
            }
            let ty: u32 = f[1].parse().map_err(|_| bad())?;
            if ty as usize >= PLANETLAB_VM_TYPES.len() {
                return Err(bad());
            }
            rows.push((f[4].to_owned(), Some(ty)));
        }
    } else {
        let entries = std::fs::read_dir(dir).map_err(|source| TraceError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        rows = names.into_iter().map(|n| (n, None)).collect();
    }
    if rows.is_empty() {
        return Err(TraceError::Empty(dir.to_owned()));
    }
    let per_type = rows.len().div_ceil(PLANETLAB_VM_TYPES.len());
    let mut vms = Vec::with_capacity(rows.len());
    let mut expected = None;
    for (i, (file, ty)) in rows.into_iter().enumerate() {
        let path = dir.join(&file);
        let mut samples = parse_samples(&path)?;
        let n = *expected.get_or_insert(samples.len());
        if samples.len() != n || n < 2 {
            return Err(TraceError::Length {
                path,
                found: samples.len(),
                expected: n.max(2),
            });
        }
        samples.push(samples[n - 1]);
        let vm_type = ty.unwrap_or((i / per_type) as u32);
        let (mips, ram_mb) = PLANETLAB_VM_TYPES[vm_type as usize];
        vms.push(VmSpec {
            name: file,
            vm_type,
            mips,
            ram_mb,
            samples,
        });
    }
    let steps = expected.unwrap_or(2);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Workload {
        name,
        vms,
        host_types: planetlab_host_types(),
        host_type_of: Vec::new(),
        interval_s: 300.0,
        steps,
        reference_quirks: true,
    }
    .with_hosts(hosts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_is_linear_between_points() {
        let g4 = &planetlab_host_types()[0];
        assert_eq!(g4.power(0.0), 86.0);
        assert_eq!(g4.power(1.0), 117.0);
        assert!((g4.power(0.05) - 87.7).abs() < 1e-9);
        assert!((g4.power(0.95) - 115.5).abs() < 1e-9);
    }

    #[test]
    fn demand_interpolates_inside_an_interval() {
        let vm = VmSpec {
            name: "a".into(),
            vm_type: 0,
            mips: 2500.0,
            ram_mb: 870,
            samples: vec![0.1, 0.3, 0.3],
        };
        assert_eq!(vm.demand_fraction(0.0, 300.0), 0.1);
        assert!((vm.demand_fraction(150.0, 300.0) - 0.2).abs() < 1e-12);
        assert_eq!(vm.demand_fraction(600.0, 300.0), 0.3);
        assert!((vm.migration_s() - 13.92).abs() < 1e-9);
    }
}
