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

/// CEF escaping of a header field (`|` and `\`).
fn cef_header(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|")
}

/// CEF escaping of an extension value (`=`, `\` and line breaks).
fn cef_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
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
    let time = entry.get("time").and_then(Value::as_str).unwrap_or("-");
    let body = match format {
        Format::Json => line.to_owned(),
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
        file.write_all(line.as_bytes())?;
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
