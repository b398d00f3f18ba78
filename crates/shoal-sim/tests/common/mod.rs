use std::path::PathBuf;

/// The PlanetLab day beside the repository (`../shared/bench/planetlab`), or `$SHOAL_PLANETLAB`.
/// Trace data is not copied into the repository; without it these tests fail loudly.
pub fn day() -> PathBuf {
    let dir = std::env::var_os("SHOAL_PLANETLAB").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/planetlab/20110303")
    });
    assert!(dir.is_dir(), "PlanetLab day not found at {} (set SHOAL_PLANETLAB)", dir.display());
    dir
}
