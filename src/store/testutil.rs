//! Test helpers: a self-deleting temp directory and a throwaway `redis-server`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A unique directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "crossbar-store-{label}-{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 6]>())
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const REDIS_BIN_DEFAULT: &str = "/usr/bin/redis-server";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Looks for the server binary: the Debian path first, then every PATH entry.
fn locate_redis_server(
    default: &Path,
    path_var: Option<std::ffi::OsString>,
) -> Result<PathBuf, String> {
    if default.is_file() {
        return Ok(default.to_path_buf());
    }
    if let Some(paths) = path_var {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("redis-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "redis-server is not installed (looked for {} and in PATH); \
         the Redis backend tests need a real server: install it with `apt-get install -y redis-server`",
        default.display()
    ))
}

fn find_redis_server() -> PathBuf {
    // Failing (not skipping) is deliberate: a silently skipped backend is an untested backend.
    locate_redis_server(Path::new(REDIS_BIN_DEFAULT), std::env::var_os("PATH"))
        .unwrap_or_else(|msg| panic!("{msg}"))
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn ping(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// A `redis-server` on 127.0.0.1 with persistence off, in its own temp dir; killed on drop.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    dir: TempDir,
}

impl RedisServer {
    pub(crate) fn start() -> Self {
        let bin = find_redis_server();
        let dir = TempDir::new("redis");
        // The port is picked by binding and releasing it; another process could grab it in
        // between, so a failed start is retried on a new port.
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            match spawn(&bin, dir.path(), port) {
                Ok(child) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        bin,
                        dir,
                    }
                }
                Err(e) => last_err = e,
            }
        }
        panic!("could not start redis-server: {last_err}");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server and starts a new, empty one on the same port.
    pub(crate) fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match spawn(&self.bin, self.dir.path(), self.port) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                // The old socket may linger briefly; keep trying until the deadline.
                Err(e) if Instant::now() > deadline => {
                    panic!("could not restart redis-server: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(bin: &Path, dir: &Path, port: u16) -> Result<Child, String> {
    let log = dir.join(format!("redis-{port}.log"));
    let log_file =
        std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let mut child = Command::new(bin)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--dir", &dir.display().to_string()])
        .args(["--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "redis-server exited with {status} on port {port}: {out}"
            ));
        }
        if ping(port) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "redis-server did not answer PING on port {port} within {STARTUP_TIMEOUT:?}: {out}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn missing_redis_server_fails_with_install_hint() {
    let dir = TempDir::new("nobin");
    let err = locate_redis_server(
        &dir.path().join("redis-server"),
        Some(dir.path().as_os_str().to_owned()),
    )
    .unwrap_err();
    assert!(err.contains("apt-get install -y redis-server"), "{err}");
    // And the real lookup finds the installed server on this machine.
    assert!(find_redis_server().is_file());
}
