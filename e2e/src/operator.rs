//! `remotemedia-operator` and `remotemedia-sidecar` as processes of their own, the way a cluster
//! runs them: their binaries, flags, admin port and log file. The tier's compile step builds them
//! (`e2e/test.sh`).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::Error;

/// A running operator or sidecar; killed when dropped.
pub struct Component {
    child: Child,
    pub admin_port: u16,
    pub log: PathBuf,
}

/// The binary `program`: `<PROGRAM>_BIN` (`REMOTEMEDIA_OPERATOR_BIN`), else beside the test
/// executables' folder (`target/<profile>/deps/..`), where `cargo build -p <program>` puts it.
fn binary(program: &str) -> Result<PathBuf, Error> {
    let variable = format!("{}_BIN", program.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&variable) {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::Process(format!("failed to find the test executable: {e}")))?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(program))
        .filter(|path| path.exists())
        .ok_or_else(|| {
            Error::Process(format!(
                "failed to find {program} beside the tests: run `cargo build -p {program}` or set {variable}"
            ))
        })?;
    Ok(path)
}

impl Component {
    /// Starts the operator with `args` (plus `--admin-port`), logging to
    /// `$REMOTEMEDIA_E2E_LOGS/operator-<name>.log` (the temporary folder without it).
    pub fn start(name: &str, args: &[&str]) -> Result<Self, Error> {
        Self::start_with_env(name, args, &[])
    }

    /// [`Component::start`] with extra environment variables, such as another `KUBECONFIG`.
    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Self, Error> {
        Self::spawn("remotemedia-operator", "operator", name, args, env)
    }

    /// Starts the sidecar with `args` (plus `--admin-port`), logging to
    /// `$REMOTEMEDIA_E2E_LOGS/sidecar-<name>.log`.
    pub fn start_sidecar(name: &str, args: &[&str]) -> Result<Self, Error> {
        Self::start_sidecar_with_env(name, args, &[])
    }

    /// [`Component::start_sidecar`] with extra environment variables, such as another
    /// `KUBECONFIG`.
    pub fn start_sidecar_with_env(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, Error> {
        Self::spawn("remotemedia-sidecar", "sidecar", name, args, env)
    }

    fn spawn(
        program: &str,
        role: &str,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, Error> {
        let admin_port = crate::ports::free_port();
        let dir =
            std::env::var_os("REMOTEMEDIA_E2E_LOGS").map_or_else(std::env::temp_dir, PathBuf::from);
        let log = dir.join(format!("{role}-{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::Process(format!("failed to open {}: {e}", log.display())))?;
        let stderr = file
            .try_clone()
            .map_err(|e| Error::Process(format!("failed to open {}: {e}", log.display())))?;
        let child = Command::new(binary(program)?)
            .args(args)
            .args(["--admin-port", &admin_port.to_string()])
            .env("RUST_LOG", "info,kube=warn")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::Process(format!("failed to start {program}: {e}")))?;
        eprintln!("{role} {name}: pid {}, log {}", child.id(), log.display());
        Ok(Self {
            child,
            admin_port,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit; true if it exited with status 0.
    pub fn terminate(&mut self) -> bool {
        let signalled = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        signalled && self.child.wait().is_ok_and(|s| s.success())
    }

    /// SIGKILL: no Lease hand-over, no clean shutdown.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET path` on the admin port: the status code and body, `None` while nothing answers.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.admin_port).into(),
            Duration::from_secs(2),
        )
        .ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())?;
        Some((code, body))
    }

    /// The value of an unlabelled metric, `None` while the admin port does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.kill();
    }
}
