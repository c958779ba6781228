//! The Prometheus view of the registry: a `prometheus-client` collector that encodes a
//! [`Snapshot`] (text exposition, OpenMetrics flavour, which Prometheus scrapes natively), and
//! a minimal HTTP responder for `GET /metrics`.

use std::borrow::Cow;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{global, OpSnapshot, Snapshot};

type Labels<'a> = Vec<(&'static str, Cow<'a, str>)>;

#[derive(Debug)]
struct Collector;

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels<'_>, u64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            m.encode_counter::<NoLabelSet, _, u64>(v, None)?;
        } else {
            m.encode_family(labels)?
                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
        }
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels<'_>, V)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            m.encode_gauge(v)?;
        } else {
            m.encode_family(labels)?.encode_gauge(v)?;
        }
    }
    Ok(())
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels<'_>, &OpSnapshot)],
) -> std::fmt::Result {
    let mut m: MetricEncoder = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, op) in rows {
        m.encode_family(labels)?.encode_histogram::<NoLabelSet>(
            op.latency.sum_seconds,
            op.latency.count,
            &op.latency.buckets(),
            None,
        )?;
    }
    Ok(())
}

/// Encodes one snapshot; names follow the Prometheus conventions (`_total` counters,
/// `_seconds` histograms, base units).
fn encode(s: &Snapshot, mut e: DescriptorEncoder) -> std::fmt::Result {
    let e = &mut e;
    let l = |k: &'static str, v: &str| -> Labels<'_> { vec![(k, Cow::Owned(v.to_string()))] };
    {
        let mut m =
            e.encode_descriptor("build", "Daemon version and role", None, MetricType::Info)?;
        let labels: Labels = vec![
            ("version", Cow::Borrowed(s.version.as_str())),
            ("role", Cow::Borrowed(s.info.role.as_str())),
        ];
        m.encode_info(&labels)?;
    }
    gauge(
        e,
        "uptime_seconds",
        "Seconds since the daemon started",
        &[(vec![], s.uptime_seconds)],
    )?;
    gauge(
        e,
        "sessions",
        "Live sessions",
        &[(vec![], s.sessions.len() as u64)],
    )?;
    counter(
        e,
        "sessions_established",
        "Sessions established since start",
        &[(vec![], s.sessions_total)],
    )?;
    counter(
        e,
        "reconnects",
        "Times the dialer re-established a lost session",
        &[(vec![], s.reconnects)],
    )?;
    counter(
        e,
        "link_bytes",
        "Bytes over the link, frames included, all sessions",
        &[
            (l("direction", "in"), s.link_bytes_in),
            (l("direction", "out"), s.link_bytes_out),
        ],
    )?;
    let rtt: Vec<(Labels, f64)> = s
        .sessions
        .iter()
        .filter_map(|x| {
            x.rtt_seconds.map(|r| {
                let labels: Labels = vec![
                    ("peer", Cow::Borrowed(x.peer.as_str())),
                    ("transport", Cow::Borrowed(x.transport.as_str())),
                ];
                (labels, r)
            })
        })
        .collect();
    gauge(
        e,
        "session_rtt_seconds",
        "Last heartbeat round trip per live session",
        &rtt,
    )?;

    let fs: Vec<(Labels, &OpSnapshot)> = s.fs_ops.iter().map(|o| (l("op", &o.name), o)).collect();
    counter(
        e,
        "fs_requests",
        "fs requests served, per operation",
        &fs.iter()
            .map(|(k, o)| (k.clone(), o.count))
            .collect::<Vec<_>>(),
    )?;
    counter(
        e,
        "fs_request_errors",
        "fs requests that returned an errno (ENOENT included), per operation",
        &fs.iter()
            .map(|(k, o)| (k.clone(), o.errors))
            .collect::<Vec<_>>(),
    )?;
    histogram(
        e,
        "fs_request_duration_seconds",
        "Time the HOST took to serve an fs request",
        &fs,
    )?;

    let calls: Vec<(Labels, &OpSnapshot)> = s
        .services
        .iter()
        .map(|x| (l("service", &x.name), &x.calls))
        .collect();
    let streams: Vec<(Labels, &OpSnapshot)> = s
        .services
        .iter()
        .map(|x| (l("service", &x.name), &x.streams))
        .collect();
    counter(
        e,
        "service_calls",
        "Calls served, per service",
        &calls
            .iter()
            .map(|(k, o)| (k.clone(), o.count))
            .collect::<Vec<_>>(),
    )?;
    counter(
        e,
        "service_call_errors",
        "Calls served with an error reply, per service",
        &calls
            .iter()
            .map(|(k, o)| (k.clone(), o.errors))
            .collect::<Vec<_>>(),
    )?;
    histogram(
        e,
        "service_call_duration_seconds",
        "Time to serve a call, per service",
        &calls,
    )?;
    counter(
        e,
        "service_streams",
        "Streams served (an exec, a bridged connection, a FIFO tunnel), per service",
        &streams
            .iter()
            .map(|(k, o)| (k.clone(), o.count))
            .collect::<Vec<_>>(),
    )?;
    gauge(
        e,
        "service_streams_open",
        "Served streams open now, per service",
        &s.services
            .iter()
            .map(|x| (l("service", &x.name), x.open_streams))
            .collect::<Vec<_>>(),
    )?;
    histogram(
        e,
        "service_stream_duration_seconds",
        "How long each served stream stayed open, per service",
        &streams,
    )?;

    let b = &s.bridge;
    counter(
        e,
        "bridge_connections",
        "Bridged Unix socket connections",
        &[(vec![], b.connections)],
    )?;
    gauge(
        e,
        "bridge_connections_open",
        "Bridged Unix socket connections open now",
        &[(vec![], b.open_connections)],
    )?;
    let kd = |kind: &'static str, dir: &'static str| -> Labels<'static> {
        vec![
            ("kind", Cow::Borrowed(kind)),
            ("direction", Cow::Borrowed(dir)),
        ]
    };
    counter(
        e,
        "bridge_bytes",
        "Bytes through the shim bridge (out: to the peer)",
        &[
            (kd("socket", "out"), b.socket_bytes_out),
            (kd("socket", "in"), b.socket_bytes_in),
            (kd("fifo", "out"), b.fifo_bytes_out),
            (kd("fifo", "in"), b.fifo_bytes_in),
        ],
    )?;
    Ok(())
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, e: DescriptorEncoder) -> std::fmt::Result {
        encode(&global().snapshot(), e)
    }
}

/// The registry in Prometheus text format, every name prefixed `offload_`.
pub fn prometheus_text() -> String {
    let mut reg = Registry::with_prefix("offload");
    reg.register_collector(Box::new(Collector));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

/// Errors of the HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listen address could not be bound.
    #[error("metrics endpoint: bind {addr}: {source}")]
    Bind {
        /// The address from `[metrics] listen`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds `addr` and answers `GET /metrics` (anything else: 404) until the runtime ends. Returns
/// the bound address (port 0 resolved) once listening.
pub async fn serve_http(addr: &str) -> Result<std::net::SocketAddr, HttpError> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = l.local_addr().map_err(|source| HttpError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((c, _)) => {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), respond(c)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

/// One request per connection: reads the head (≤ 8 KiB), answers, closes.
async fn respond(mut c: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            break;
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") | ("HEAD", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            prometheus_text(),
        ),
        ("GET", _) | ("HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "try /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_string(),
        ),
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        resp.extend_from_slice(body.as_bytes());
    }
    c.write_all(&resp).await?;
    c.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_conventional_names() {
        crate::fs_op("getattr", Duration::from_micros(20), true);
        let t = prometheus_text();
        assert!(t.contains("# TYPE offload_fs_requests counter"), "{t}");
        assert!(
            t.contains("offload_fs_requests_total{op=\"getattr\"}"),
            "{t}"
        );
        assert!(t.contains("# TYPE offload_fs_request_duration_seconds histogram"));
        assert!(
            t.contains("offload_fs_request_duration_seconds_bucket{le=\"+Inf\",op=\"getattr\"}")
                || t.contains(
                    "offload_fs_request_duration_seconds_bucket{op=\"getattr\",le=\"+Inf\"}"
                ),
            "{t}"
        );
        assert!(t.trim_end().ends_with("# EOF"));
    }
}
