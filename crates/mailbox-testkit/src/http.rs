//! A bare HTTP/1.0 GET over a `TcpStream` and a parser of the Prometheus
//! text format, for tests of the nodes' `/metrics` and `/healthz`.
//!
//! HTTP/1.0 without keep-alive makes the server delimit the body by closing
//! the connection, so reading to the end is the whole parser; no HTTP
//! client crate is needed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code, headers (lower-case names) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers by lower-case name.
    pub headers: BTreeMap<String, String>,
    /// Body as text.
    pub body: String,
}

/// `GET http://{addr}{path}`, with a 10 s limit.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<HttpResponse> {
    http_request(addr, "GET", path, Duration::from_secs(10)).await
}

/// `{method} http://{addr}{path}` without a body, with a time limit.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    limit: Duration,
) -> anyhow::Result<HttpResponse> {
    http_request_as(addr, method, path, limit, None).await
}

/// [`http_request`] with an `Authorization` header (`Basic …`, `Bearer …`).
pub async fn http_request_as(
    addr: &str,
    method: &str,
    path: &str,
    limit: Duration,
    authorization: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    tokio::time::timeout(limit, async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        parse_response(&String::from_utf8(raw).context("response is not UTF-8")?)
    })
    .await
    .with_context(|| format!("{method} {addr}{path} timed out"))?
}

fn parse_response(text: &str) -> anyhow::Result<HttpResponse> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of headers in response")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Every sample, in page order.
    pub samples: Vec<Sample>,
    /// `# TYPE` of each family.
    pub types: BTreeMap<String, String>,
    /// `# HELP` of each family.
    pub help: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses the text exposition format; fails on any malformed line.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut out = Scrape {
            samples: Vec::new(),
            types: BTreeMap::new(),
            help: BTreeMap::new(),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                out.help.insert(name.into(), help.into());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("TYPE without a type")?;
                out.types.insert(name.into(), kind.into());
            } else if line.starts_with('#') {
                continue;
            } else {
                out.samples
                    .push(parse_sample(line).with_context(|| format!("bad line {line:?}"))?);
            }
        }
        Ok(out)
    }

    /// Value of the first sample of `name` carrying every label in `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => bail!("no value"),
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            r = r.strip_prefix(',').unwrap_or(r);
            let (k, after) = r.split_once("=\"").context("label without =\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("dangling escape"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            };
            labels.insert(k.to_string(), value);
            r = &after[end + 1..];
        }
    } else {
        rest
    };
    let value = rest.trim();
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_labels_and_escapes() {
        let s = Scrape::parse(
            "# HELP a_total Things.\n# TYPE a_total counter\na_total{dc=\"e\",v=\"x\\\"y\\\\z\\n\"} 3\nb 1.5\nc{} +Inf\n",
        )
        .unwrap();
        assert_eq!(s.types["a_total"], "counter");
        assert_eq!(s.help["a_total"], "Things.");
        assert_eq!(s.get("a_total", &[("v", "x\"y\\z\n")]), Some(3.0));
        assert_eq!(s.get("a_total", &[("dc", "w")]), None);
        assert_eq!(s.get("b", &[]), Some(1.5));
        assert_eq!(s.get("c", &[]), Some(f64::INFINITY));
        assert!(Scrape::parse("a{x=\"1} 2\n").is_err());
        assert!(Scrape::parse("a\n").is_err());
    }

    #[test]
    fn parses_a_response() {
        let r = parse_response(
            "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nno\n",
        )
        .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.headers["content-type"], "text/plain");
        assert_eq!(r.body, "no\n");
    }
}
