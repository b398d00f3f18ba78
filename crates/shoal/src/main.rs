//! `shoal`: one binary for the controller (`server`), the host agent (`agent`), the all-in-one
//! mode (`up`) and the client commands (`shoal <noun> <verb>`).

mod cli;
mod commands;
mod config;
mod daemons;
mod error;
mod images;
mod networks;
mod output;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(commands::run(args));
    if let Err(e) = result {
        eprintln!("error: {}", error::message(&e));
        std::process::exit(1);
    }
}
