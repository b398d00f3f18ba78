//! A small QMP client: JSON lines over QEMU's unix socket. Replies are matched to commands by
//! `id`, because asynchronous events arrive interleaved with them. Every exchange has a
//! deadline, so a QEMU that stops answering is an error, never a hang.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket {path} did not answer {what} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        what: String,
        timeout: Duration,
    },
    #[error("QMP socket {path} closed during {what}")]
    Closed { path: PathBuf, what: String },
    #[error("QMP I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP sent something that is not JSON: {0}")]
    Protocol(String),
}

pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    timeout: Duration,
    /// Events received while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                path: path.into(),
                what: "connect".into(),
                timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: path.into(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: path.into(),
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            timeout,
            events: Vec::new(),
        };
        // QEMU can write an event to a connection it has just accepted before the greeting: it
        // still treats the socket as the previous client's, who was in command mode (seen in CI
        // with BLOCK_JOB_COMPLETED). Such events are kept like any other.
        loop {
            let m = qmp.read_message("the greeting").await?;
            if m.get("QMP").is_some() {
                break;
            }
            if m.get("event").is_none() {
                return Err(QmpError::Protocol(format!("expected a greeting, got {m}")));
            }
            qmp.events.push(m);
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(self.timeout, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout {
                path: self.path.clone(),
                what: what.into(),
                timeout: self.timeout,
            })?
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                path: self.path.clone(),
                what: what.into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("JSON");
        bytes.push(b'\n');
        tokio::time::timeout(self.timeout, self.writer.write_all(&bytes))
            .await
            .map_err(|_| QmpError::Timeout {
                path: self.path.clone(),
                what: command.into(),
                timeout: self.timeout,
            })?
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let m = self.read_message(command).await?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("?").into(),
                    desc: e["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Ok(m.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// The run state: `running`, `paused`, `inmigrate`, `postmigrate`, `shutdown`, …
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None).await?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// A QEMU that still treats a just-accepted socket as its previous client's writes an
    /// event before the greeting. The client keeps the event and connects.
    #[tokio::test]
    async fn an_event_before_the_greeting_is_kept_and_the_connection_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"event\":\"BLOCK_JOB_COMPLETED\",\"data\":{\"device\":\"x\"}}\n")
                .await
                .unwrap();
            w.write_all(b"{\"QMP\":{\"version\":{}}}\n").await.unwrap();
            for ret in ["{}", "{\"status\":\"running\"}"] {
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                let id = serde_json::from_str::<Value>(&line).unwrap()["id"].clone();
                w.write_all(format!("{{\"return\":{ret},\"id\":{id}}}\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), "running");
        assert_eq!(qmp.events.len(), 1);
        assert_eq!(qmp.events[0]["event"], "BLOCK_JOB_COMPLETED");
        server.await.unwrap();
    }

    /// Anything else before the greeting is a protocol error naming what came.
    #[tokio::test]
    async fn a_reply_before_the_greeting_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"return\":{}}\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let err = Qmp::connect(&path, Duration::from_secs(5)).await.err().unwrap();
        assert!(
            err.to_string().contains("expected a greeting, got {\"return\":{}}"),
            "{err}"
        );
    }
}
