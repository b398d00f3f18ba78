use std::path::PathBuf;

/// The PlanetLab day: `$SHOAL_PLANETLAB`, else beside the repository (`../shared/bench/planetlab`),
/// else where these machines keep the shared data (`/work/shared/bench/planetlab`). Trace data is
/// not copied into the repository; without it these tests fail loudly, naming where they looked.
pub fn day() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("SHOAL_PLANETLAB").filter(|d| !d.is_empty()) {
        Some(d) => vec![PathBuf::from(d)],
        None => vec![
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/planetlab/20110303"),
            PathBuf::from("/work/shared/bench/planetlab/20110303"),
        ],
    };
    candidates.iter().find(|d| d.is_dir()).cloned().unwrap_or_else(|| {
        panic!("PlanetLab day not found at any of {candidates:?} (set SHOAL_PLANETLAB to the day's directory)")
    })
}
