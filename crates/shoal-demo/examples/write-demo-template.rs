//! Writes the demo template (`disk.raw`, `vmlinux`, `initrd.cpio`) into a directory and prints
//! its paths and kernel command line, for scripts that boot it with bare QEMU
//! (scripts/migration/): `cargo run --release -p shoal-demo --example write-demo-template -- DIR`.
fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: write-demo-template DIR");
        std::process::exit(2);
    };
    match shoal_demo::build_demo_template(std::path::Path::new(&dir)) {
        Ok(t) => {
            println!("disk={}", t.disk.display());
            println!("kernel={}", t.kernel.display());
            println!("initrd={}", t.initrd.display());
            println!("cmdline={}", t.cmdline);
        }
        Err(e) => {
            eprintln!("write-demo-template: {e}");
            std::process::exit(1);
        }
    }
}
