//! The one way the agent runs an external program: bounded in time, stderr captured into the
//! error, nothing inherited on stdin.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} exited with {status}: {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{program} did not finish within {timeout:?}")]
    TimedOut { program: String, timeout: Duration },
}

/// Runs `program args` and returns its stdout.
pub fn run_command(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, CommandError> {
    run_command_with_input(program, args, None, timeout)
}

/// Runs `program args` with `input` on its stdin (never argv: secrets and scripts go here).
pub fn run_command_with_input(
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, CommandError> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run(cmd, program, input, timeout)
}

/// The variables a program run by [`run_command_in`] keeps from the agent's environment.
const KEPT_ENVIRONMENT: [&str; 3] = ["PATH", "HOME", "TMPDIR"];

/// [`run_command_with_input`] in the directory `dir`, with an environment of only
/// [`KEPT_ENVIRONMENT`]: nothing else the agent was started with reaches the program.
pub fn run_command_in(
    dir: &std::path::Path,
    program: &str,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, CommandError> {
    run(command_in(dir, program, args, env), program, input, timeout)
}

/// `program args` in `dir`, with an environment of only [`KEPT_ENVIRONMENT`] and `env`.
fn command_in(
    dir: &std::path::Path,
    program: &str,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir).env_clear();
    for name in KEPT_ENVIRONMENT {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Ok when the program succeeded, else its status and stderr.
fn succeeded(
    program: &str,
    status: std::process::ExitStatus,
    stderr: Option<std::thread::JoinHandle<String>>,
) -> Result<(), CommandError> {
    if status.success() {
        return Ok(());
    }
    let stderr = stderr.and_then(|r| r.join().ok()).unwrap_or_default();
    Err(CommandError::Failed {
        program: program.into(),
        status: status.to_string(),
        stderr: stderr.trim().to_string(),
    })
}

/// [`run_command_in`] with the program's stdout written to `out` as it comes (a tar stream,
/// say), not collected; returns the bytes written. Bounded by the reader of `out` rather than
/// a timeout: a write to `out` that fails (the reader went away) kills the program.
pub fn stream_command_in(
    dir: &std::path::Path,
    program: &str,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
    input: Option<&[u8]>,
    out: &mut dyn std::io::Write,
) -> Result<u64, CommandError> {
    let spawn_error = |source| CommandError::Spawn {
        program: program.into(),
        source,
    };
    let (mut child, stderr_reader) = spawn(
        command_in(dir, program, args, env),
        program,
        input.is_some(),
    )?;
    // A small input (a key line) fits the pipe's buffer: written before stdout is read.
    write_input(&mut child, program, input)?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let copied = std::io::copy(&mut stdout, out);
    drop(stdout);
    if copied.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(spawn_error)?;
    succeeded(program, status, stderr_reader)?;
    copied.map_err(spawn_error)
}

/// Starts `cmd` with stdout piped, stdin piped when `input` (else empty), and stderr drained
/// on a thread of its own (whose text the handle gives).
fn spawn(
    mut cmd: Command,
    program: &str,
    input: bool,
) -> Result<(std::process::Child, Option<std::thread::JoinHandle<String>>), CommandError> {
    let mut child = cmd
        .stdin(if input { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.into(),
            source,
        })?;
    let stderr_reader = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        })
    });
    Ok((child, stderr_reader))
}

/// Writes `input` to the child's stdin and closes it; on failure the child is killed.
fn write_input(
    child: &mut std::process::Child,
    program: &str,
    input: Option<&[u8]>,
) -> Result<(), CommandError> {
    use std::io::Write;
    let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) else {
        return Ok(());
    };
    // Dropping the handle closes the pipe.
    stdin.write_all(data).map_err(|source| {
        let _ = child.kill();
        let _ = child.wait();
        CommandError::Spawn {
            program: program.into(),
            source,
        }
    })
}

fn run(
    cmd: Command,
    program: &str,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, CommandError> {
    let (mut child, stderr_reader) = spawn(cmd, program, input.is_some())?;
    // Drained concurrently so a chatty program never blocks on a full pipe.
    let stdout_reader = child.stdout.take().map(|mut out| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        })
    });
    // Written while stdout/stderr are drained.
    write_input(&mut child, program, input)?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::TimedOut {
                    program: program.into(),
                    timeout,
                });
            }
            Err(source) => {
                return Err(CommandError::Spawn {
                    program: program.into(),
                    source,
                });
            }
        }
    };
    succeeded(program, status, stderr_reader)?;
    Ok(stdout_reader
        .and_then(|r| r.join().ok())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_stdout_as_it_comes_and_fails_with_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        let written = stream_command_in(
            dir.path(),
            "sh",
            &[
                "-c",
                "read key; echo \"$key:$(pwd):$EXTRA\"; head -c 100000 /dev/zero",
            ],
            &[("EXTRA", std::ffi::OsStr::new("given"))],
            Some(b"k1\n"),
            &mut out,
        )
        .unwrap();
        let first = format!("k1:{}:given\n", dir.path().display());
        assert_eq!(written as usize, first.len() + 100_000);
        assert!(out.starts_with(first.as_bytes()));
        let err = stream_command_in(
            dir.path(),
            "sh",
            &["-c", "echo no >&2; exit 2"],
            &[],
            None,
            &mut out,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "sh exited with exit status: 2: no");
        // A reader that went away stops the program.
        struct Gone;
        impl std::io::Write for Gone {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let started = Instant::now();
        assert!(stream_command_in(dir.path(), "sh", &["-c", "yes"], &[], None, &mut Gone).is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn captures_stdout_and_stderr() {
        assert_eq!(
            run_command("sh", &["-c", "echo hi"], Duration::from_secs(5)).unwrap(),
            "hi\n"
        );
        let err = run_command(
            "sh",
            &["-c", "echo boom >&2; exit 3"],
            Duration::from_secs(5),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "sh exited with exit status: 3: boom");
        let err = run_command("/nonexistent/prog", &[], Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot run /nonexistent/prog"), "{err}");
        let err = run_command("sleep", &["5"], Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not finish"), "{err}");
        let echoed =
            run_command_with_input("cat", &[], Some(b"secret on stdin"), Duration::from_secs(5))
                .unwrap();
        assert_eq!(echoed, "secret on stdin");
    }
}
