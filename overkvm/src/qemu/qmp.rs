//! A small blocking QMP client: line-delimited JSON on a unix socket.
//!
//! Why not the `qapi` crate: its typed schema (qapi-qmp 0.15) follows a newer QEMU than the
//! 7.2 that Debian ships, and `query-blockstats` fails to decode there (the `zone_append_*`
//! counters are mandatory in its schema and absent from 7.2's replies). overkvm drives
//! whichever qemu the host has and needs four commands, so replies stay `serde_json::Value`.
//!
//! Protocol: the server greets with `{"QMP": ...}`, the client sends `qmp_capabilities`, then
//! commands; each reply is `{"return": ...}` or `{"error": {"class", "desc"}}`, echoing the
//! command's `id`; `{"event": ...}` lines may arrive at any time and are kept aside. A monitor
//! serves one client at a time, so connections here are short.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};

/// Longest reply line accepted (query-blockstats of many disks stays far below).
const MAX_LINE: u64 = 16 << 20;
/// Events kept for the caller; older ones are dropped.
const MAX_EVENTS: usize = 64;

/// Why a QMP exchange failed. Callers branch on `Closed` (qemu exited, e.g. after `quit`)
/// and `Command` (qemu refused the command).
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    // Not a `source`: the text already carries the I/O error, and anyhow's chain would print
    // it twice.
    #[error("{}", io_text(.0))]
    Io(io::Error),
    /// qemu closed the connection.
    #[error("qemu closed the QMP connection")]
    Closed,
    /// Something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// qemu answered with an error.
    #[error("qemu refused: {class}: {desc}")]
    Command { class: String, desc: String },
}

fn io_text(e: &io::Error) -> String {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        "QMP did not answer in time (another client may hold the monitor)".into()
    } else {
        format!("QMP I/O: {e}")
    }
}

impl From<io::Error> for QmpError {
    fn from(e: io::Error) -> Self {
        QmpError::Io(e)
    }
}

/// One line from the server.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Greeting(Value),
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event {
        name: String,
        data: Value,
    },
}

/// Characters of an offending line quoted in a protocol error.
const QUOTE_CHARS: usize = 200;

/// At most [`QUOTE_CHARS`] characters of a JSON value. A precision in a format string does
/// not cut a `serde_json::Value` (its `Display` ignores it), so `{v:.200}` would quote a
/// 16 MiB reply whole.
fn quote(v: &Value) -> String {
    v.to_string().chars().take(QUOTE_CHARS).collect()
}

/// Classifies one line of QMP output.
pub fn parse_message(line: &str) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {:.200}", line.trim())))?;
    let Some(obj) = v.as_object() else {
        return Err(QmpError::Protocol(format!("not an object: {}", quote(&v))));
    };
    let id = obj.get("id").cloned();
    if let Some(g) = obj.get("QMP") {
        Ok(Message::Greeting(g.clone()))
    } else if let Some(r) = obj.get("return") {
        Ok(Message::Return {
            id,
            value: r.clone(),
        })
    } else if let Some(e) = obj.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(Message::Error {
            id,
            class: s("class"),
            desc: s("desc"),
        })
    } else if let Some(name) = obj.get("event").and_then(Value::as_str) {
        Ok(Message::Event {
            name: name.to_string(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
        })
    } else {
        Err(QmpError::Protocol(format!(
            "unknown message: {}",
            quote(&v)
        )))
    }
}

/// A negotiated QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// The greeting's `QMP` object (version, capabilities).
    pub greeting: Value,
    /// Names of the events seen so far (e.g. `POWERDOWN`, `SHUTDOWN`), oldest first.
    pub events: Vec<String>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation. `timeout` bounds
    /// each read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            greeting: Value::Null,
            events: Vec::new(),
        };
        match qmp.read()? {
            Message::Greeting(g) => qmp.greeting = g,
            other => {
                return Err(QmpError::Protocol(format!(
                    "expected a greeting, got {other:?}"
                )));
            }
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Message, QmpError> {
        let mut line = String::new();
        let n = (&mut self.reader).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            return Err(QmpError::Protocol(format!(
                "reply longer than {MAX_LINE} bytes"
            )));
        }
        parse_message(&line)
    }

    /// Runs one command and returns its `return` value. Events that arrive meanwhile are
    /// recorded in [`Qmp::events`]; replies to other ids are ignored.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        match self.writer.write_all(line.as_bytes()) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(QmpError::Closed),
            r => r?,
        }
        let ours = |m: &Option<Value>| m.as_ref().and_then(Value::as_u64) == Some(id);
        loop {
            match self.read()? {
                Message::Return { id: rid, value } if ours(&rid) => return Ok(value),
                Message::Error {
                    id: rid,
                    class,
                    desc,
                } if ours(&rid) => return Err(QmpError::Command { class, desc }),
                Message::Event { name, .. } => {
                    if self.events.len() == MAX_EVENTS {
                        self.events.remove(0);
                    }
                    self.events.push(name);
                }
                _ => {}
            }
        }
    }

    /// The connection's socket (for `SO_PEERCRED`: which process serves the monitor).
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.writer)
    }

    /// `query-status`: the run state (`running`, `paused`, `shutdown`, ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None)?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status returned {}", quote(&v))))
    }
}

/// One of overkvm's own running VMs: its name, its uuid and the pid of its qemu.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnVm {
    pub name: String,
    pub uuid: Option<String>,
    pub pid: u32,
}

/// overkvm's own VMs, whose QMP monitors are overkvm's. The VM lifecycle lists them; it hands
/// this to whoever needs their monitors (the throttle's QEMU actuator), so that a service does
/// not import a command's module.
pub trait OwnVms: Send {
    /// The VMs that run now (read again on each call: a VM started later is found).
    fn running(&self) -> Vec<OwnVm>;
    /// The QMP socket of the VM named `name`; None when no VM can have that name.
    fn qmp_socket(&self, name: &str) -> Option<PathBuf>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{os::unix::net::UnixListener, thread};

    #[test]
    fn messages() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
        assert!(
            matches!(parse_message(g).unwrap(), Message::Greeting(v) if v["version"]["qemu"]["major"] == 7)
        );
        assert_eq!(
            parse_message(r#"{"return": {}, "id": 3}"#).unwrap(),
            Message::Return {
                id: Some(json!(3)),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "CommandNotFound", "desc": "no"}}"#).unwrap(),
            Message::Error {
                id: None,
                class: "CommandNotFound".into(),
                desc: "no".into()
            }
        );
        let ev = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#;
        assert!(
            matches!(parse_message(ev).unwrap(), Message::Event { name, data } if name == "SHUTDOWN" && data["guest"] == false)
        );
        for bad in ["", "[]", "{}", "{\"event\": 1}", "nope", "\"x\""] {
            assert!(
                matches!(parse_message(bad), Err(QmpError::Protocol(_))),
                "{bad:?}"
            );
        }
    }

    /// Found by the `qmp` fuzz target: a long line that is JSON but not a QMP message was
    /// quoted whole in the error.
    #[test]
    fn protocol_errors_quote_at_most_200_characters() {
        let long_string = format!("\"{}\"", "a".repeat(600));
        let long_array = format!("[{}1]", "1,".repeat(300));
        let long_object = format!("{{\"x\": \"{}\"}}", "b".repeat(600));
        let long_junk = format!("{{{}", "c".repeat(600));
        for line in [long_string, long_array, long_object, long_junk] {
            let Err(QmpError::Protocol(m)) = parse_message(&line) else {
                panic!("accepted {line:.20}");
            };
            assert!(m.chars().count() < 300, "{} characters: {m:.40}", m.len());
        }
    }

    /// A fake qemu monitor: greeting, then answers by script, with events in between.
    #[test]
    fn client_against_fake_server() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut seen = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                line.clear();
                let id = v["id"].clone();
                seen.push(v["execute"].as_str().unwrap().to_string());
                match v["execute"].as_str().unwrap() {
                    "qmp_capabilities" => writeln!(w, "{}", json!({"return": {}, "id": id})),
                    "query-status" => {
                        writeln!(w, r#"{{"event": "RESUME", "timestamp": {{}}}}"#).unwrap();
                        writeln!(w, "{}", json!({"return": {}, "id": 999})).unwrap();
                        writeln!(w, "{}", json!({"return": {"status": "running", "running": true}, "id": id}))
                    }
                    "quit" => {
                        // qemu may close before replying.
                        break;
                    }
                    _ => writeln!(w, "{}", json!({"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}, "id": id})),
                }
                .unwrap();
            }
            seen
        });
        let mut q = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        assert_eq!(q.status().unwrap(), "running");
        assert_eq!(q.events, vec!["RESUME".to_string()]);
        match q.execute("x", None) {
            Err(QmpError::Command { class, desc }) => {
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("has not been found"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(q.execute("quit", None), Err(QmpError::Closed)));
        assert_eq!(
            server.join().unwrap(),
            ["qmp_capabilities", "query-status", "x", "quit"]
        );
    }

    #[test]
    fn errors_say_what_happened() {
        let slow = QmpError::Io(io::Error::from(io::ErrorKind::WouldBlock));
        assert!(
            slow.to_string().contains("did not answer in time"),
            "{slow}"
        );
        let io = QmpError::Io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(io.to_string().starts_with("QMP I/O: "), "{io}");
        assert!(std::error::Error::source(&io).is_none(), "printed once");
        let refused = QmpError::Command {
            class: "GenericError".into(),
            desc: "no".into(),
        };
        assert_eq!(refused.to_string(), "qemu refused: GenericError: no");
    }
}
