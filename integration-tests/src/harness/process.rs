//! One service as a child process: the real binary, configured only through `APP_*` environment
//! variables (as a Kubernetes pod is), logging to a file, on a port chosen before it starts so a
//! restart comes back at the same address. `kill -9`, restart, pause (SIGSTOP) and resume
//! (SIGCONT). Dropping it kills it (SIGKILL) and reaps it, so a failed test leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::wait::poll;
use crate::SERVICE_TOKEN;

/// The binary `name` next to this test's executable (`target/<profile>/deps/..`), built first
/// when it is missing or older than the sources it is made of (`services/<name>` and `libs/`).
pub fn binary(name: &str) -> PathBuf {
    binaries(&[name]).remove(0)
}

/// Like [`binary`] for several services, with one `cargo build` for all the stale ones (one
/// cargo run instead of eight while others edit `libs/`).
pub fn binaries(names: &[&str]) -> Vec<PathBuf> {
    let exe = std::env::current_exe().expect("the test knows its executable");
    // Tests run from target/<profile>/deps, binaries (the `chaos` runner) from target/<profile>.
    let dir = exe.parent().expect("the executable is in a folder");
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>/deps has a parent")
    } else {
        dir
    }
    .to_path_buf();
    let workspace = workspace_dir();
    let libs = newest_source(&workspace.join("libs"));
    let path = |name: &str| profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let stale: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| {
            let built = std::fs::metadata(path(name))
                .and_then(|m| m.modified())
                .ok();
            let newest = newest_source(&workspace.join("services").join(name)).max(libs);
            match (built, newest) {
                (None, _) => true,
                (Some(b), Some(n)) => n > b,
                (Some(_), None) => false,
            }
        })
        .collect();
    if !stale.is_empty() {
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The whole workspace, as `make test` builds it (debug: with the tests, whose
        // dev-dependencies' features the test binaries were built with): per-package builds
        // unify features differently and would rebuild half the dependency tree each time one
        // alternates.
        let mut args = vec!["build", "--workspace", "--bins"];
        if release {
            args.push("--release");
        } else {
            args.push("--tests");
        }
        println!(
            "{stale:?} missing or older than their sources: running `cargo {}`",
            args.join(" ")
        );
        let status = Command::new(cargo)
            .args(&args)
            .current_dir(&workspace)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo {} failed", args.join(" "));
    }
    names
        .iter()
        .map(|name| {
            let binary = path(name);
            assert!(
                binary.exists(),
                "{} does not exist (run `cargo build --workspace --bins --tests`)",
                binary.display()
            );
            binary
        })
        .collect()
}

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests lives in the workspace")
        .to_path_buf()
}

/// The newest modification time of a `.rs` or `Cargo.toml` file under `dir`.
fn newest_source(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let t = if path.is_dir() {
            if name == "target" {
                continue;
            }
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") || name == "Cargo.toml" {
            entry.metadata().and_then(|m| m.modified()).ok()
        } else {
            None
        };
        newest = newest.max(t);
    }
    newest
}

/// A free TCP port on 127.0.0.1 (free now; the service binds it when it starts).
pub fn free_port() -> u16 {
    reserve_port().port()
}

/// A port on 127.0.0.1 held by this process until the reservation is dropped: nothing else this
/// process binds meanwhile (a fault proxy on port 0, say) can be given it.
pub fn reserve_port() -> PortReservation {
    PortReservation(std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
}

/// See [`reserve_port`].
pub struct PortReservation(std::net::TcpListener);

impl PortReservation {
    pub fn port(&self) -> u16 {
        self.0.local_addr().expect("local addr").port()
    }
}

/// A service process; see the module documentation.
pub struct ServiceProcess {
    name: String,
    binary: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    port: u16,
    generation: u32,
    child: Option<Child>,
    paused: bool,
    log: PathBuf,
    client: reqwest::Client,
}

impl ServiceProcess {
    /// Starts `binary` with exactly `env` (plus `APP_HTTP__PORT=port`), logging to
    /// `<dir>/<name>-1.log`. Nothing `APP_*` leaks in from the test's environment, and the
    /// working directory is `dir`, so no config file is picked up by accident.
    pub fn spawn(
        name: &str,
        binary: &Path,
        env: Vec<(String, String)>,
        dir: &Path,
        port: u16,
    ) -> Self {
        let mut p = ServiceProcess {
            name: name.to_owned(),
            binary: binary.to_path_buf(),
            env,
            dir: dir.to_path_buf(),
            port,
            generation: 0,
            child: None,
            paused: false,
            log: PathBuf::new(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
        };
        p.start();
        p
    }

    fn start(&mut self) {
        self.generation += 1;
        self.log = self
            .dir
            .join(format!("{}-{}.log", self.name, self.generation));
        let out = std::fs::File::create(&self.log).expect("log file");
        let mut cmd = Command::new(&self.binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("APP_") {
                cmd.env_remove(key);
            }
        }
        cmd.current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("APP_HTTP__PORT", self.port.to_string())
            .env("APP_HTTP__HOST", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{} starts: {e}", self.binary.display())),
        );
        self.paused = false;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many times it was started.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `http://127.0.0.1:<port>`
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address())
    }

    /// The environment it runs with (without the port).
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Replaces (or adds) one environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// The last `lines` lines of the current generation's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// True while the process exists (paused counts as running).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until `/readyz` answers 200; panics with the log's end when the process exits or
    /// the time is up.
    pub async fn wait_ready(&mut self, within: Duration) {
        let ready = poll(within, Duration::from_millis(50), async || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "{} exited during start ({status}); its log:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            let r = self
                .client
                .get(self.url("/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 200 => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        if let Err(last) = ready {
            panic!(
                "{} was not ready within {within:?} (last answer: {last}); its log:\n{}",
                self.name,
                self.log_tail(30)
            );
        }
    }

    /// `kill -9`, and waits for the process to be gone. Returns its exit status.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // `Child::kill` sends SIGKILL on Unix (also to a stopped process).
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGTERM (graceful shutdown), then SIGKILL if it has not exited within `grace`.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let pid = self.pid()?;
        if self.paused {
            self.resume();
        }
        signal(pid, "TERM");
        let exited = poll(grace, Duration::from_millis(50), async || {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Ok(status),
                _ => Err(()),
            }
        })
        .await;
        match exited {
            Ok(status) => {
                self.child = None;
                Some(status)
            }
            Err(()) => self.kill9(),
        }
    }

    /// Starts it again with the same environment and port (killing it first if it still runs).
    pub fn restart(&mut self) {
        self.kill9();
        self.start();
    }

    /// SIGSTOP: the process keeps its sockets and state but does nothing.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
            self.paused = true;
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
            self.paused = false;
        }
    }

    /// `GET path` with the service token: (status, JSON body or `Null`).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} answers GET {path}: {e}", self.name));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `kill -<sig> <pid>` (no libc binding needed for three signals).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}
