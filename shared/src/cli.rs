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

/// Raises this process's limit of open files to its hard limit (a daemon holds a descriptor
/// per connection; systemd's units set `LimitNOFILE`, and a shell's soft 1,024 would let a
/// thousand idle connections stop every other client). Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the open files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// For a daemon that holds keys: no core dump of it is ever written, and no other process of
/// its user may attach to it or read its memory (`PR_SET_DUMPABLE` 0; the units also set
/// `LimitCORE=0`).
pub fn protect_memory() {
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(%error, "cannot make this process non-dumpable");
    }
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
