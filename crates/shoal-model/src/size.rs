//! Sizes as operators write them (`512MiB`, `2GiB`), held as whole MiB.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {reason}")]
pub struct SizeError {
    pub input: String,
    pub reason: String,
}

/// Parses a size into MiB. Units are binary (`KiB`, `MiB`, `GiB`, `TiB`, also written `K`, `M`,
/// `G`, `T`); a bare number means MiB. Fractions are allowed when the result is a whole MiB
/// (`1.5GiB`). Zero is refused: nothing in Shoal has a size of zero.
pub fn parse_size_mib(input: &str) -> Result<u64, SizeError> {
    let err = |reason: &str| SizeError {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let s = input.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(err("expected a number, e.g. 512MiB or 2GiB"));
    }
    let kib_per_unit: u64 = match unit.trim() {
        "KiB" | "K" | "k" => 1,
        "" | "MiB" | "M" => 1024,
        "GiB" | "G" => 1024 * 1024,
        "TiB" | "T" => 1024 * 1024 * 1024,
        other => return Err(err(&format!("unknown unit {other:?} (use KiB, MiB, GiB or TiB)"))),
    };
    // Work in KiB with an exact decimal fraction so that `1.5GiB` is exact.
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(err("malformed number"));
    }
    if frac.len() > 6 {
        return Err(err("too many decimal places"));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| err("number too large"))?
    };
    let scale = 10u64.pow(frac.len() as u32);
    let frac_val: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| err("malformed number"))?
    };
    let kib = whole
        .checked_mul(kib_per_unit)
        .and_then(|w| w.checked_add(frac_val * kib_per_unit / scale))
        .ok_or_else(|| err("number too large"))?;
    if !(frac_val * kib_per_unit).is_multiple_of(scale) || !kib.is_multiple_of(1024) {
        return Err(err("must be a whole number of MiB"));
    }
    let mib = kib / 1024;
    if mib == 0 {
        return Err(err("must be greater than zero"));
    }
    Ok(mib)
}

/// Formats MiB the way [`parse_size_mib`] reads it back, in the largest exact unit.
pub fn format_mib(mib: u64) -> String {
    if mib != 0 && mib.is_multiple_of(1024 * 1024) {
        format!("{}TiB", mib / (1024 * 1024))
    } else if mib != 0 && mib.is_multiple_of(1024) {
        format!("{}GiB", mib / 1024)
    } else {
        format!("{mib}MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size_mib("512MiB"), Ok(512));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("1.5GiB"), Ok(1536));
        assert_eq!(parse_size_mib("1024"), Ok(1024));
        assert_eq!(parse_size_mib("2048KiB"), Ok(2));
        assert_eq!(parse_size_mib("1TiB"), Ok(1024 * 1024));
    }

    #[test]
    fn refuses_bad_sizes_naming_them() {
        for bad in ["", "MiB", "0", "0GiB", "12XB", "1.2.3G", "1500KiB", "-1G", "1e3M"] {
            let e = parse_size_mib(bad).unwrap_err();
            assert_eq!(e.input, bad, "{e}");
        }
        assert!(parse_size_mib("99999999999999999999T").is_err());
    }

    #[test]
    fn format_round_trips() {
        for mib in [1, 512, 1024, 1536, 2048, 1024 * 1024] {
            assert_eq!(parse_size_mib(&format_mib(mib)), Ok(mib));
        }
        assert_eq!(format_mib(2048), "2GiB");
        assert_eq!(format_mib(1536), "1536MiB");
    }
}
