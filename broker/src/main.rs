//! `thingsgate`: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the hot path allocates per message (topics, events, envelopes); measured with
/// `cargo bench -p broker --bench twin_load` against the system allocator (README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = broker::cli::Cli::parse();
    match broker::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
