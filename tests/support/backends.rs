//! The data path's real parts on loopback: restic and its REST server, an S3 server (versitygw) and a
//! PostgreSQL server, built or installed once by `tests/backends/build.sh`; each server lives as long
//! as its handle.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static TOOLS: OnceLock<PathBuf> = OnceLock::new();

/// The directory holding restic, rest-server and versitygw.
pub fn tools() -> &'static Path {
    TOOLS.get_or_init(|| {
        let out = Command::new(super::repo_root().join("tests/backends/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("tests/backends/build.sh runs");
        assert!(out.status.success(), "tests/backends/build.sh failed");
        PathBuf::from(String::from_utf8(out.stdout).expect("UTF-8 path").trim())
    })
}

pub fn restic() -> PathBuf {
    tools().join("restic")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("an address").port()
}

fn wait_for_port(port: u16, what: &str) {
    wait_for_address(std::net::Ipv4Addr::LOCALHOST.into(), port, what);
}

fn wait_for_address(ip: std::net::IpAddr, port: u16, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect((ip, port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server process, killed when dropped.
pub struct Server {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// restic's REST server without authentication, on loopback.
pub fn rest_server() -> Server {
    rest_server_on(std::net::Ipv4Addr::LOCALHOST.into())
}

/// restic's REST server without authentication, listening on `ip` (the node's IP, for Pods).
pub fn rest_server_on(ip: std::net::IpAddr) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let child = Command::new(tools().join("rest-server"))
        .args(["--listen", &std::net::SocketAddr::new(ip, port).to_string(), "--no-auth", "--path"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rest-server starts");
    wait_for_address(ip, port, "rest-server");
    Server { port, child, _dir: dir }
}

pub const S3_ACCESS_KEY: &str = "AKIASTASHTEST";
pub const S3_SECRET_KEY: &str = "stash-test-s3-secret-key";

/// versitygw serving a directory over S3.
pub fn s3_server() -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let child = Command::new(tools().join("versitygw"))
        .args(["--access", S3_ACCESS_KEY, "--secret", S3_SECRET_KEY, "--port", &format!("127.0.0.1:{port}"), "--quiet"])
        .arg("posix")
        .arg(dir.path())
        .env_remove("ROOT_ACCESS_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("versitygw starts");
    wait_for_port(port, "versitygw");
    Server { port, child, _dir: dir }
}

pub const PG_PASSWORD: &str = "pg-test-password-5be2";

/// A throwaway PostgreSQL server on loopback, password-authenticated, run as user `postgres`.
pub fn postgres() -> Server {
    use std::os::unix::process::CommandExt;
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (tests/backends/build.sh)")
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .max()
        .expect("a PostgreSQL version");
    let (uid, gid) = postgres_ids();
    let dir = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, PG_PASSWORD).expect("password file");
    std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown");
    let data = dir.path().join("data");
    let init = Command::new(bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync", "-E", "UTF8"])
        .args(["--locale=C", "--pwfile"])
        .arg(&pwfile)
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("initdb runs");
    assert!(init.success(), "initdb failed");
    let port = free_port();
    let child = Command::new(bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-c", "listen_addresses=127.0.0.1", "-p", &port.to_string(), "-c", "fsync=off", "-k"])
        .arg(dir.path())
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("postgres starts");
    wait_for_port(port, "postgres");
    Server { port, child, _dir: dir }
}

fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line = passwd.lines().find(|l| l.starts_with("postgres:")).expect("a postgres user");
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().expect("uid"), fields[3].parse().expect("gid"))
}

/// Runs SQL as the superuser; returns what psql printed (unaligned, tuples only).
pub fn psql(port: u16, database: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", database])
        .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .env("PGPASSWORD", PG_PASSWORD)
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
