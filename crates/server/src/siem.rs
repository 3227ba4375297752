//! SIEM export: the audit trail streams out to a rotating JSON-lines file and/or a syslog
//! collector over TLS (RFC 5424 messages, RFC 5425 framing), each entry as JSON or as CEF.
//!
//! Every sink forwards from the durable audit log itself, from a cursor it persists after the
//! sink accepted a batch (`DATA_DIR/siem/<sink>.cursor`). So the audit log is the buffer and the
//! spill: a slow or absent SIEM never blocks a request and loses nothing; after an outage the
//! sink resumes where it stopped, and `twinguard_siem_lag_entries{sink}` says how far behind it
//! is. Delivery is at least once (a batch cut off by a crash is sent again; entries carry
//! `seq` and `correlationId` to deduplicate). Syslog over TLS has no acknowledgement: a collector
//! that closes its connection is noticed before the next batch, but one that vanishes without
//! closing (power loss) can lose what was in flight to it; RELP would close that gap.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twinguard_audit::log::AuditLog;
use twinguard_core::text::is_invisible_or_breaking;

/// Entries sent per batch at most.
const BATCH: usize = 512;
/// Pause between attempts while a sink is down or caught up.
const IDLE: Duration = Duration::from_millis(200);
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Cef,
}

/// Where the audit trail goes.
#[derive(Debug, Clone)]
pub enum Sink {
    /// JSON lines, rotated at `max_bytes` keeping `keep` old files (`PATH.1` newest).
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: usize,
    },
    /// Syslog over TLS to `address` (host:port), trusting `ca` (PEM).
    Syslog {
        address: String,
        server_name: String,
        ca: PathBuf,
        format: Format,
    },
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Sink::File { .. } => "file",
            Sink::Syslog { .. } => "syslog",
        }
    }
}

/// Writes `c` as `\uXXXX` (UTF-16 code units, a surrogate pair beyond the BMP): JSON's escape,
/// and the visible form of a hidden character in CEF, where a client's own backslash is always
/// escaped, so `\u` comes only from here.
fn push_escaped(out: &mut String, c: char) {
    let mut units = [0u16; 2];
    for unit in c.encode_utf16(&mut units) {
        out.push_str(&format!("\\u{unit:04x}"));
    }
}

/// CEF escaping of a header field: `|` and `\`, and every control, format (bidi, zero-width)
/// and line or paragraph separator character as `\uXXXX`.
fn cef_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            c if is_invisible_or_breaking(c) => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

/// CEF escaping of an extension value: `=`, `\`, CR and LF as CEF defines them, and every other
/// control, format (bidi, zero-width) and line or paragraph separator character as `\uXXXX`.
fn cef_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if is_invisible_or_breaking(c) => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

/// A JSON text on one line with nothing hidden: inside strings every control, format and line or
/// paragraph separator character becomes `\uXXXX` (the same JSON value); outside strings, where
/// only JSON whitespace can be, it becomes a space. U+2028, NEL and bidi controls, which JSON
/// allows raw in strings, so never reach a log reader or a line-splitting collector.
pub fn json_one_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in line.chars() {
        if is_invisible_or_breaking(c) {
            if in_string {
                push_escaped(&mut out, c);
            } else {
                out.push(' ');
            }
            escaped = false;
            continue;
        }
        out.push(c);
        if !in_string {
            in_string = c == '"';
        } else if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_string = false;
        }
    }
    out
}

/// An RFC 5424 header field: printable US-ASCII only, `-` when nothing is left.
fn header_field(s: &str) -> String {
    let kept: String = s.chars().filter(|c| c.is_ascii_graphic()).collect();
    if kept.is_empty() {
        "-".to_owned()
    } else {
        kept
    }
}

fn severity(outcome: &str) -> u8 {
    match outcome {
        "ok" => 1,
        "refused" => 3,
        "unauthenticated" | "denied" => 5,
        "throttled" => 6,
        _ => 7,
    }
}

/// An audit entry as a CEF record (ArcSight Common Event Format 0).
pub fn to_cef(entry: &Value) -> String {
    let text = |k: &str| entry.get(k).and_then(Value::as_str).unwrap_or("");
    let outcome = text("outcome");
    let kind = entry
        .get("event")
        .and_then(Value::as_str)
        .unwrap_or_else(|| text("kind"));
    let name = format!("{} {}", text("method"), text("path"));
    let mut ext = vec![
        format!("rt={}", cef_value(text("time"))),
        format!("src={}", cef_value(text("address"))),
        format!("suser={}", cef_value(text("principal"))),
        format!("requestMethod={}", cef_value(text("method"))),
        format!("request={}", cef_value(text("path"))),
        format!("outcome={}", cef_value(outcome)),
        format!(
            "cn1Label=status cn1={}",
            entry.get("status").and_then(Value::as_u64).unwrap_or(0)
        ),
        format!(
            "cn2Label=seq cn2={}",
            entry.get("seq").and_then(Value::as_u64).unwrap_or(0)
        ),
        format!(
            "cs1Label=correlationId cs1={}",
            cef_value(text("correlationId"))
        ),
    ];
    if let Some(account) = entry.get("account").and_then(Value::as_str) {
        ext.push(format!("cs2Label=account cs2={}", cef_value(account)));
    }
    format!(
        "CEF:0|twinguard|twinguard|{}|{}|{}|{}|{}",
        cef_header(env!("CARGO_PKG_VERSION")),
        cef_header(kind),
        cef_header(&name),
        severity(outcome),
        ext.join(" ")
    )
}

/// An RFC 5424 syslog message for an entry: facility "log audit" (13), severity informational
/// for answered requests and warning otherwise.
pub fn to_syslog(entry: &Value, line: &str, format: Format, hostname: &str) -> String {
    let ok = entry.get("outcome").and_then(Value::as_str) == Some("ok");
    let pri = 13 * 8 + if ok { 6 } else { 4 };
    let time = header_field(entry.get("time").and_then(Value::as_str).unwrap_or("-"));
    let hostname = header_field(hostname);
    let body = match format {
        Format::Json => json_one_line(line),
        Format::Cef => to_cef(entry),
    };
    format!("<{pri}>1 {time} {hostname} twinguard - audit - {body}")
}

struct Cursor {
    path: PathBuf,
    /// Byte offset in `entries.jsonl` and the index of the next entry to send.
    offset: u64,
    next: u64,
}

impl Cursor {
    fn load(path: PathBuf) -> Self {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut parts = text
            .split_whitespace()
            .filter_map(|p| p.parse::<u64>().ok());
        let (offset, next) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        Self { path, offset, next }
    }

    fn save(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(format!("{} {}\n", self.offset, self.next).as_bytes())?;
        std::fs::rename(tmp, &self.path)
    }
}

/// Reads up to [`BATCH`] durable entries from the cursor on.
fn read_batch(log: &AuditLog, cursor: &Cursor) -> std::io::Result<Vec<String>> {
    let durable = log.head().size;
    if cursor.next >= durable {
        return Ok(Vec::new());
    }
    let mut file = std::fs::File::open(log.dir().join("entries.jsonl"))?;
    file.seek(SeekFrom::Start(cursor.offset))?;
    let mut reader = BufReader::new(file);
    let mut out = Vec::new();
    let wanted = ((durable - cursor.next) as usize).min(BATCH);
    while out.len() < wanted {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || !line.ends_with('\n') {
            break;
        }
        out.push(line);
    }
    Ok(out)
}

/// Starts forwarding to `sink`; runs until the process ends.
pub fn spawn(log: AuditLog, sink: Sink, state_dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)?;
    let cursor = Cursor::load(state_dir.join(format!("{}.cursor", sink.name())));
    let tls = match &sink {
        Sink::Syslog { ca, .. } => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots.add(cert?)?;
            }
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        }
        Sink::File { .. } => None,
    };
    tokio::spawn(forward(log, sink, cursor, tls));
    Ok(())
}

async fn forward(
    log: AuditLog,
    sink: Sink,
    mut cursor: Cursor,
    tls: Option<tokio_rustls::TlsConnector>,
) {
    let label = sink.name();
    let hostname = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty() && !h.contains(' '))
        .unwrap_or_else(|| "twinguard".into());
    let mut connection: Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> = None;
    loop {
        metrics::gauge!("twinguard_siem_lag_entries", "sink" => label)
            .set(log.head().size.saturating_sub(cursor.next) as f64);
        let batch = match read_batch(&log, &cursor) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(sink = label, error = %e, "reading the audit log for the SIEM failed");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::time::sleep(IDLE).await;
            continue;
        }
        let sent = match &sink {
            Sink::File {
                path,
                max_bytes,
                keep,
            } => write_file(path, *max_bytes, *keep, &batch),
            Sink::Syslog {
                address,
                server_name,
                format,
                ..
            } => {
                let result = send_syslog(
                    &mut connection,
                    tls.as_ref(),
                    address,
                    server_name,
                    *format,
                    &hostname,
                    &batch,
                )
                .await;
                if result.is_err() {
                    connection = None;
                }
                result
            }
        };
        match sent {
            Ok(()) => {
                cursor.offset += batch.iter().map(|l| l.len() as u64).sum::<u64>();
                cursor.next += batch.len() as u64;
                if let Err(e) = cursor.save() {
                    tracing::warn!(sink = label, error = %e, "saving the SIEM cursor failed");
                }
                metrics::counter!("twinguard_siem_sent_total", "sink" => label)
                    .increment(batch.len() as u64);
            }
            Err(e) => {
                tracing::warn!(sink = label, error = %e, behind = log.head().size.saturating_sub(cursor.next), "the SIEM did not take the audit entries; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

fn write_file(path: &Path, max_bytes: u64, keep: usize, batch: &[String]) -> anyhow::Result<()> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size >= max_bytes {
        for i in (1..keep).rev() {
            let from = path.with_extension(format!("jsonl.{i}"));
            if from.exists() {
                std::fs::rename(&from, path.with_extension(format!("jsonl.{}", i + 1)))?;
            }
        }
        std::fs::rename(path, path.with_extension("jsonl.1"))?;
    }
    // The export holds the audit trail: its owner's only, whatever the umask.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    for line in batch {
        file.write_all(json_one_line(line.trim_end()).as_bytes())?;
        file.write_all(b"\n")?;
    }
    file.sync_data()?;
    Ok(())
}

async fn send_syslog(
    connection: &mut Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    tls: Option<&tokio_rustls::TlsConnector>,
    address: &str,
    server_name: &str,
    format: Format,
    hostname: &str,
    batch: &[String],
) -> anyhow::Result<()> {
    if connection.is_none() {
        let tls = tls.context("no TLS configuration")?;
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(address),
        )
        .await
        .context("connecting timed out")??;
        let name = ServerName::try_from(server_name.to_owned())?;
        *connection = Some(tls.connect(name, tcp).await?);
    }
    let stream = connection.as_mut().context("no connection")?;
    // A collector that went away has closed the connection; writing into it would "succeed"
    // into the kernel's buffer and lose the batch. Look for the close first.
    let mut probe = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await {
        Err(_) => {}
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => anyhow::bail!("the collector closed the connection"),
    }
    let mut frames = Vec::new();
    for line in batch {
        let entry: Value = serde_json::from_str(line.trim_end()).unwrap_or(Value::Null);
        let message = to_syslog(&entry, line.trim_end(), format, hostname);
        // RFC 5425 octet counting: the length, a space, the message.
        frames.extend_from_slice(format!("{} {message}", message.len()).as_bytes());
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        stream.write_all(&frames).await?;
        stream.flush().await
    })
    .await
    .context("sending timed out")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Strings an attacker would send: anything, with line and paragraph separators, NEL, bidi
    /// overrides and isolates, zero-width characters, CEF and JSON metacharacters made likely.
    fn hostile_text() -> impl Strategy<Value = String> {
        let hostile = prop::sample::select(vec![
            '\n',
            '\r',
            '\u{0}',
            '\u{1b}',
            '\u{7f}',
            '\u{85}',
            '\u{2028}',
            '\u{2029}',
            '\u{202e}',
            '\u{2066}',
            '\u{2069}',
            '\u{200b}',
            '\u{200f}',
            '\u{feff}',
            '\u{ad}',
            '\u{e0001}',
            '|',
            '=',
            '\\',
            '"',
            'u',
        ]);
        prop::collection::vec(prop_oneof![any::<char>(), hostile], 0..24)
            .prop_map(|chars| chars.into_iter().collect())
    }

    fn assert_nothing_hidden(what: &str, text: &str) {
        for c in text.chars() {
            assert!(
                !is_invisible_or_breaking(c),
                "{what} carries U+{:04X} unescaped: {text:?}",
                c as u32
            );
        }
    }

    proptest! {
        #[test]
        fn siem_records_never_carry_a_hidden_or_line_breaking_character_and_stay_one_record(
            fields in prop::collection::vec(hostile_text(), 8),
            hostname in hostile_text(),
        ) {
            let entry = serde_json::json!({
                "seq": 1, "kind": fields[0], "time": fields[1], "address": fields[2],
                "method": fields[3], "path": fields[4], "status": 400, "outcome": fields[5],
                "principal": fields[6], "account": fields[7], "correlationId": "c-1"
            });
            let line = serde_json::to_string(&entry).unwrap();
            let cef = to_cef(&entry);
            assert_nothing_hidden("CEF", &cef);
            for format in [Format::Cef, Format::Json] {
                let message = to_syslog(&entry, &line, format, &hostname);
                assert_nothing_hidden("syslog", &message);
            }
            // The JSON forms are still the same entry, on one line.
            let exported = json_one_line(&line);
            assert_nothing_hidden("JSON line", &exported);
            let back: Value = serde_json::from_str(&exported).unwrap();
            prop_assert_eq!(back, entry);
        }

        #[test]
        fn json_one_line_keeps_every_json_value(value in hostile_text(), key in hostile_text()) {
            let pretty = serde_json::to_string_pretty(
                &serde_json::json!({ key.clone(): [value.clone(), {"k": value}] }),
            )
            .unwrap();
            let exported = json_one_line(&pretty);
            assert_nothing_hidden("JSON line", &exported);
            prop_assert_eq!(
                serde_json::from_str::<Value>(&exported).unwrap(),
                serde_json::from_str::<Value>(&pretty).unwrap()
            );
        }
    }

    #[test]
    fn a_line_separator_in_a_path_cannot_forge_a_second_cef_record() {
        let entry = serde_json::json!({
            "seq": 1, "kind": "request", "method": "GET", "outcome": "denied",
            "path": "/digitaltwins/a\u{2028}CEF:0|twinguard|twinguard|1|login|forged|1|suser=admin",
            "principal": "\u{202e}nimda", "status": 404,
        });
        let cef = to_cef(&entry);
        assert!(cef.contains("/digitaltwins/a\\u2028CEF:0"), "{cef}");
        assert!(cef.contains("suser=\\u202enimda"), "{cef}");
        assert!(!cef.contains(['\u{2028}', '\u{202e}']), "{cef}");
    }

    #[test]
    fn cef_escapes_and_maps_the_entry() {
        let entry = serde_json::json!({
            "seq": 7, "kind": "request", "time": "2026-11-22T06:00:00Z", "address": "10.0.0.1",
            "method": "GET", "path": "/digitaltwins/a|b=c", "status": 403, "outcome": "denied",
            "principal": "p-1", "correlationId": "c-1"
        });
        let cef = to_cef(&entry);
        assert!(cef.starts_with("CEF:0|twinguard|twinguard|"), "{cef}");
        assert!(
            cef.contains("|request|GET /digitaltwins/a\\|b=c|5|"),
            "{cef}"
        );
        assert!(cef.contains("request=/digitaltwins/a|b\\=c"), "{cef}");
        assert!(cef.contains("cn2Label=seq cn2=7"), "{cef}");
        let syslog = to_syslog(&entry, "{}", Format::Cef, "host");
        assert!(
            syslog.starts_with("<108>1 2026-11-22T06:00:00Z host twinguard - audit - CEF:0|"),
            "{syslog}"
        );
    }
}
