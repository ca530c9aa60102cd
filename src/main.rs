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
            eprintln!("ticketd: {}", sentence(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many errors name their cause
/// in their own message and hold it as their source too, and the chain
/// printed both (a full disk said "No space left on device" twice). A
/// cause is left out only when the error it caused already says it.
fn sentence(e: &anyhow::Error) -> String {
    let mut said = e.to_string();
    let mut parent = said.clone();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !parent.contains(&cause) {
            said.push_str(": ");
            said.push_str(&cause);
        }
        parent = cause;
    }
    said
}
