//! `remotemedia-operator`, `remotemedia-sidecar` and `remotemedia-model-worker` as processes of
//! their own, the way a cluster runs them: their binaries, flags, admin port and log file. The
//! tier's compile step builds them (`e2e/test.sh`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::Error;

/// A running operator, sidecar or worker; killed when dropped.
pub struct Component {
    child: Child,
    pub admin_port: u16,
    /// Where its admin port answers: loopback, or a worker's pod IP.
    admin: SocketAddr,
    pub log: PathBuf,
}

/// The binary `program`: `<PROGRAM>_BIN` (`REMOTEMEDIA_OPERATOR_BIN`), else beside the test
/// executables' folder (`target/<profile>/deps/..`), where `cargo build -p <program>` puts it.
pub fn binary(program: &str) -> Result<PathBuf, Error> {
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

    /// [`Component::start_sidecar`] with extra environment variables, such as a `KUBECONFIG`
    /// holding a service account's token.
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
        let mut command = Command::new(binary(program)?);
        command
            .args(args)
            .args(["--admin-port", &admin_port.to_string()])
            .envs(env.iter().copied());
        Self::spawn_command(command, role, name, ([127, 0, 0, 1], admin_port).into())
    }

    /// Starts `command` (which serves its admin port at `admin`), logging to
    /// `$REMOTEMEDIA_E2E_LOGS/<role>-<name>.log` (the temporary folder without it).
    pub fn spawn_command(
        mut command: Command,
        role: &str,
        name: &str,
        admin: SocketAddr,
    ) -> Result<Self, Error> {
        let program = command.get_program().to_string_lossy().into_owned();
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
        // A caller's own RUST_LOG wins.
        if !command.get_envs().any(|(key, _)| key == "RUST_LOG") {
            command.env("RUST_LOG", "info,kube=warn");
        }
        let child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::Process(format!("failed to start {program}: {e}")))?;
        eprintln!("{role} {name}: pid {}, log {}", child.id(), log.display());
        Ok(Self {
            child,
            admin_port: admin.port(),
            admin,
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
        let mut stream = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2)).ok()?;
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

    /// A counter or gauge summed over its labels (`name` may end in a label set, `{path="x"}`);
    /// 0 when no series matches. Panics while the admin port does not answer.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").expect("the admin port answers");
        body.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// A sidecar's endpoints of `namespace`'s models from `/debug/endpoints`, one line each:
    /// `namespace/model address node colocated`. `None` while the admin port does not answer.
    pub fn endpoint_lines(&self, namespace: &str) -> Option<Vec<String>> {
        let (code, body) = self.get("/debug/endpoints")?;
        (code == 200).then(|| {
            body.lines()
                .filter(|line| line.starts_with(&format!("{namespace}/")))
                .map(|line| line.split('\t').collect::<Vec<_>>().join(" "))
                .collect()
        })
    }

    /// Waits until a sidecar lists exactly `want`, in any order, for `namespace`
    /// ([`Component::endpoint_lines`]).
    pub async fn wait_for_endpoints(
        &self,
        namespace: &str,
        want: &[String],
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut want = want.to_vec();
        want.sort();
        let want = &want;
        crate::wait_until(
            &format!("the sidecar to list {want:?}"),
            timeout,
            || async move {
                let mut lines = self.endpoint_lines(namespace);
                if let Some(lines) = &mut lines {
                    lines.sort();
                }
                Ok(match lines {
                    Some(lines) if lines == *want => crate::Probe::Done(()),
                    seen => crate::Probe::Waiting(format!("{seen:?}")),
                })
            },
        )
        .await
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
