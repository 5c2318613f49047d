//! Database members: a dump streamed into `restic backup --stdin`, and restored by streaming
//! `restic dump` into the database's client. The member's target names a Secret with the connection
//! (`host`, `port`, `username`, `password`, optional `database`); its task name picks the engine
//! (`postgres…` — the default without a task — or `mysql…`/`mariadb…`; any other is refused). The password reaches the tools through
//! their environment, never argv.

use super::executor::AgentError;
pub use crate::executor_pod::Engine;
use crate::restic::secrets::SecretValues;
use crate::restic::{BackupOutcome, Restic, ResticError};
use std::process::Stdio;
use tokio::process::Command;

#[derive(Clone)]
pub struct Connection {
    engine: Engine,
    host: String,
    port: String,
    username: String,
    secrets: SecretValues,
    database: Option<String>,
}

impl Connection {
    pub fn from_secret(engine: Engine, secrets: SecretValues) -> Result<Self, AgentError> {
        let host = secrets.require("host")?.to_string();
        let username = secrets.require("username")?.to_string();
        secrets.require("password")?;
        let default_port = if engine == Engine::Postgres { "5432" } else { "3306" };
        let port = secrets.get("port").unwrap_or(default_port).to_string();
        let database = secrets.get("database").map(str::to_string);
        // Dump tools take the name as an argument: one starting with `-` would be read as an option.
        if database.as_deref().is_some_and(|d| d.starts_with('-')) {
            return Err(AgentError::Database("the Secret's database key may not start with '-'".into()));
        }
        Ok(Connection { engine, host, port, username, secrets, database })
    }

    /// The file name of the dump inside the snapshot.
    pub fn dump_filename(&self) -> String {
        format!("{}.sql", self.database.as_deref().unwrap_or("all-databases"))
    }

    fn password(&self) -> &str {
        self.secrets.get("password").unwrap_or_default()
    }

    fn dump_command(&self) -> Command {
        let mut command;
        match (self.engine, &self.database) {
            (Engine::Postgres, Some(db)) => {
                command = Command::new("pg_dump");
                // --clean --if-exists: the dump replaces what a restore finds instead of colliding with it.
                command.args(["--clean", "--if-exists", "--no-password", "--dbname", db]);
            }
            (Engine::Postgres, None) => {
                command = Command::new("pg_dumpall");
                command.args(["--clean", "--if-exists", "--no-password"]);
            }
            (Engine::Mysql, database) => {
                command = Command::new("mysqldump");
                command.args(["--single-transaction", "--routines", "--events"]);
                match database {
                    Some(db) => command.args(["--databases", db]),
                    None => command.arg("--all-databases"),
                };
            }
        }
        self.connect(&mut command);
        command
    }

    fn restore_command(&self) -> Command {
        let mut command;
        match self.engine {
            Engine::Postgres => {
                command = Command::new("psql");
                command.args(["--no-password", "--quiet", "--set", "ON_ERROR_STOP=1", "--single-transaction"]);
                command.args(["--dbname", self.database.as_deref().unwrap_or("postgres")]);
            }
            Engine::Mysql => command = Command::new("mysql"),
        }
        self.connect(&mut command);
        command
    }

    fn connect(&self, command: &mut Command) {
        match self.engine {
            Engine::Postgres => {
                command.args(["--host", &self.host, "--port", &self.port, "--username", &self.username]);
                command.env("PGPASSWORD", self.password());
            }
            Engine::Mysql => {
                command.args([format!("--host={}", self.host), format!("--port={}", self.port)]);
                command.arg(format!("--user={}", self.username));
                command.env("MYSQL_PWD", self.password());
            }
        }
        command.kill_on_drop(true);
    }

    /// Streams a dump into a restic snapshot. A dump that fails leaves no snapshot behind.
    pub async fn backup(&self, restic: &Restic, host: &str, tags: &[String]) -> Result<BackupOutcome, AgentError> {
        let mut dump = self.dump_command();
        dump.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = dump.spawn().map_err(|e| AgentError::Database(format!("starting the dump: {e}")))?;
        let stdout = child.stdout.take().ok_or_else(|| AgentError::Database("the dump has no output".into()))?;
        let stdin: Stdio = stdout.try_into().map_err(|e| AgentError::Database(format!("piping the dump: {e}")))?;
        let filename = self.dump_filename();
        let (dumped, backed_up) =
            tokio::join!(child.wait_with_output(), restic.backup_stdin(&filename, host, tags, None, stdin));
        let dumped = dumped.map_err(|e| AgentError::Database(format!("waiting for the dump: {e}")))?;
        let failure = (!dumped.status.success()).then(|| self.tool_failure("dump", &dumped.stderr));
        match ended(failure, backed_up) {
            Ended::Saved(outcome) => Ok(outcome),
            Ended::Forget { snapshot, failure } => {
                restic.forget(&[snapshot]).await?;
                Err(failure)
            }
            Ended::Failed(failure) => Err(failure),
        }
    }

    /// Streams the dump `file` of `snapshot` back into the database.
    pub async fn restore(&self, restic: &Restic, snapshot: &str, file: &str) -> Result<(), AgentError> {
        let mut dump = restic.dump(snapshot, file)?;
        let stdout = dump.stdout.take().ok_or_else(|| AgentError::Database("restic dump has no output".into()))?;
        let stdin: Stdio = stdout.try_into().map_err(|e| AgentError::Database(format!("piping the dump: {e}")))?;
        let mut load = self.restore_command();
        load.stdin(stdin).stdout(Stdio::null()).stderr(Stdio::piped());
        let loader = load.spawn().map_err(|e| AgentError::Database(format!("starting the database client: {e}")))?;
        let (dumped, loaded) = tokio::join!(restic.finish_child(dump), loader.wait_with_output());
        let loaded = loaded.map_err(|e| AgentError::Database(format!("waiting for the database client: {e}")))?;
        dumped?;
        if !loaded.status.success() {
            return Err(AgentError::Database(self.tool_failure("load", &loaded.stderr)));
        }
        Ok(())
    }

    fn tool_failure(&self, what: &str, stderr: &[u8]) -> String {
        let text = String::from_utf8_lossy(stderr);
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join("; ");
        // Only the password is secret; host, port and user help the reader.
        let password = self.password();
        let tail = if password.is_empty() { tail } else { tail.replace(password, "<redacted>") };
        let tail = if tail.is_empty() { "it printed nothing".to_string() } else { tail };
        format!("{what} of {} failed: {tail}", self.dump_filename())
    }
}

/// How a dump streamed into restic ended.
#[derive(Debug)]
enum Ended {
    Saved(BackupOutcome),
    /// restic saved what a failed dump wrote: a snapshot that must go.
    Forget {
        snapshot: String,
        failure: AgentError,
    },
    Failed(AgentError),
}

/// The end of a dump that failed with `dump_failure` (None when it succeeded) into a restic backup
/// that ended with `backed_up`. A dump that fails leaves no snapshot behind.
fn ended(dump_failure: Option<String>, backed_up: Result<BackupOutcome, ResticError>) -> Ended {
    match (dump_failure, backed_up) {
        (None, Ok(outcome)) => Ended::Saved(outcome),
        (None, Err(err)) => Ended::Failed(err.into()),
        (Some(failure), Ok(outcome)) => {
            Ended::Forget { snapshot: outcome.summary.snapshot_id, failure: AgentError::Database(failure) }
        }
        // Which failed first is unknown, but a dump cut off by restic's exit says only "broken pipe".
        (Some(failure), Err(err)) => Ended::Failed(AgentError::Database(format!("{err}; {failure}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn engine_and_file_names() {
        assert_eq!(Engine::from_task(Some("mysql-backup-8.0.21")), Ok(Engine::Mysql));
        assert_eq!(Engine::from_task(Some("postgres-backup-15")), Ok(Engine::Postgres));
        assert_eq!(Engine::from_task(None), Ok(Engine::Postgres));
        let refused = Engine::from_task(Some("mongodb-backup-4.2.3")).expect_err("not PostgreSQL by default");
        assert!(refused.starts_with("task.name \"mongodb-backup-4.2.3\" names no database engine"), "{refused}");
        let values: BTreeMap<String, String> =
            [("host", "127.0.0.1"), ("username", "app"), ("password", "pw-123"), ("database", "shop")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let connection = Connection::from_secret(Engine::Postgres, SecretValues::from_map("/db", values)).unwrap();
        assert_eq!(connection.dump_filename(), "shop.sql");
        let dump = connection.dump_command();
        let argv: Vec<String> = dump.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(!argv.iter().any(|a| a.contains("pw-123")), "{argv:?}");
        assert!(Connection::from_secret(Engine::Postgres, SecretValues::from_map("/db", BTreeMap::new())).is_err());
    }

    /// When restic fails first (a wrong password, a backend down), the dump dies of the closed
    /// pipe, often with nothing on stderr: restic's reason is the one that says what to fix.
    #[test]
    fn a_dump_cut_off_by_restic_says_why_restic_failed() {
        let wrong = ResticError::WrongPassword("s3:http://127.0.0.1:9000/stash/shop".into());
        let Ended::Failed(failure) = ended(Some("dump of shop.sql failed: ".into()), Err(wrong)) else {
            panic!("nothing was saved");
        };
        let message = failure.to_string();
        assert!(message.contains("wrong RESTIC_PASSWORD") && message.contains("dump of shop.sql failed"), "{message}");
        let unreachable = ResticError::Unreachable { url: "rest:http://x".into(), reason: "refused".into() };
        assert!(matches!(ended(None, Err(unreachable)), Ended::Failed(AgentError::Restic(_))));
    }

    /// L7: `mysqldump --databases <db>` reads a name starting with `-` as an option.
    #[test]
    fn a_database_name_that_reads_as_an_option_is_refused() {
        let values: BTreeMap<String, String> =
            [("host", "127.0.0.1"), ("username", "app"), ("password", "pw-123"), ("database", "--all-databases")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let refused = Connection::from_secret(Engine::Mysql, SecretValues::from_map("/db", values));
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("database"), "{message}");
    }
}
