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
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, CommandError> {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir).env_clear();
    for name in KEPT_ENVIRONMENT {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    run(cmd, program, input, timeout)
}

fn run(
    mut cmd: Command,
    program: &str,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, CommandError> {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.into(),
            source,
        })?;
    // Drained concurrently so a chatty program never blocks on a full pipe.
    let stdout_reader = child.stdout.take().map(|mut out| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        })
    });
    let stderr_reader = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        })
    });
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        // Written while stdout/stderr are drained; dropping the handle closes the pipe.
        if let Err(source) = stdin.write_all(data) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CommandError::Spawn {
                program: program.into(),
                source,
            });
        }
    }
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
    let stdout = stdout_reader
        .and_then(|r| r.join().ok())
        .unwrap_or_default();
    let stderr = stderr_reader
        .and_then(|r| r.join().ok())
        .unwrap_or_default();
    if !status.success() {
        return Err(CommandError::Failed {
            program: program.into(),
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

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
