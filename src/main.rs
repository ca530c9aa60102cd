//! The `ticketd` binary: parse the command line, set up logging, hand over
//! to the library. Errors print as one sentence and exit with status 1.

use std::process::ExitCode;

use clap::Parser;
use ticketd::cli::Cli;

/// mimalloc: the claim path allocates a few small, short-lived buffers per
/// request (body, JSON, response); glibc's malloc showed ~8% of a rush's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match ticketd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ticketd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
