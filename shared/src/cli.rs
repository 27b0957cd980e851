//! What every berth binary does the same way: log to stderr (level from `BERTH_LOG`, colour only
//! on a terminal), print results to stdout without panicking when the reader went away, and end
//! with exit 0 or a one-line error.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Exit 0, or print `error: <cause chain on one line>` and exit 1.
pub fn finish<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Prints a line of results. A reader that stopped reading (`berthctl hosts | head -1`, or
/// `grep -q`) ends the program quietly with success instead of a panic.
pub fn print_line(text: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}")
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// `println!` for command results: see [`print_line`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}
