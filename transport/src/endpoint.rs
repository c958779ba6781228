//! Link addresses as URLs, so every daemon and tool takes the same spelling.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// `VMADDR_CID_ANY`: listen on every CID.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// Where a link listens or connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `tcp://HOST:PORT` (HOST may be a name, an IPv4 address or a bracketed IPv6 address).
    Tcp {
        /// Name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// `unix:///PATH`.
    Unix {
        /// Absolute socket path.
        path: PathBuf,
    },
    /// `vsock://CID:PORT`, or `vsock://any:PORT` to listen on every CID.
    Vsock {
        /// Context id ([`VSOCK_CID_ANY`] to listen on all).
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// `vsock-uds:///PATH:PORT`: the host end of a Firecracker/Cloud-Hypervisor "hybrid vsock".
    /// Connecting writes `CONNECT <port>\n` to the Unix socket at PATH; listening accepts
    /// guest-initiated connections on `<PATH>_<port>`.
    VsockUds {
        /// The hypervisor's Unix socket.
        path: PathBuf,
        /// vsock port inside the guest.
        port: u32,
    },
    /// `rdma://IP:PORT` (RDMA CM over an RC queue pair).
    Rdma {
        /// IP address of an RDMA-capable interface.
        host: String,
        /// RDMA CM port.
        port: u16,
    },
}

/// A malformed endpoint; the message names what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// No `scheme://` prefix.
    #[error("endpoint {0:?}: missing scheme; expected tcp://HOST:PORT, unix:///PATH, vsock://CID:PORT, vsock-uds:///PATH:PORT or rdma://IP:PORT")]
    MissingScheme(String),
    /// A scheme that is not one of the links.
    #[error("endpoint {0:?}: unknown scheme {1:?}; expected tcp, unix, vsock, vsock-uds or rdma")]
    UnknownScheme(String, String),
    /// No `:PORT` where one is needed.
    #[error("endpoint {0:?}: expected HOST:PORT after the scheme")]
    MissingPort(String),
    /// The port is not a number in range.
    #[error("endpoint {0:?}: port {1:?} is not a number in 1..=65535 (0 only to listen on an ephemeral port)")]
    BadPort(String, String),
    /// Nothing between the scheme and the port.
    #[error("endpoint {0:?}: empty host")]
    EmptyHost(String),
    /// A Unix socket path that is not absolute.
    #[error("endpoint {0:?}: the Unix socket path must be absolute (unix:///run/x.sock)")]
    RelativePath(String),
    /// A vsock CID that is neither a number nor `any`.
    #[error("endpoint {0:?}: CID {1:?} is not a number or \"any\"")]
    BadCid(String, String),
    /// A link kind name (config, CLI) that is not one of the links.
    #[error("unknown transport {0:?}; expected tcp, unix, vsock, vsock-uds or rdma")]
    UnknownTransport(String),
}

fn split_port<'a>(url: &str, rest: &'a str) -> Result<(&'a str, &'a str), EndpointError> {
    let idx = rest
        .rfind(':')
        .ok_or_else(|| EndpointError::MissingPort(url.to_string()))?;
    Ok((&rest[..idx], &rest[idx + 1..]))
}

fn parse_u16(url: &str, s: &str) -> Result<u16, EndpointError> {
    s.parse::<u16>()
        .map_err(|_| EndpointError::BadPort(url.to_string(), s.to_string()))
}

fn parse_u32(url: &str, s: &str) -> Result<u32, EndpointError> {
    s.parse::<u32>()
        .map_err(|_| EndpointError::BadPort(url.to_string(), s.to_string()))
}

fn host_port(url: &str, rest: &str) -> Result<(String, u16), EndpointError> {
    let (host, port) = split_port(url, rest)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(EndpointError::EmptyHost(url.to_string()));
    }
    Ok((host.to_string(), parse_u16(url, port)?))
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| EndpointError::MissingScheme(url.to_string()))?;
        match scheme {
            "tcp" => {
                let (host, port) = host_port(url, rest)?;
                Ok(Endpoint::Tcp { host, port })
            }
            "rdma" => {
                let (host, port) = host_port(url, rest)?;
                Ok(Endpoint::Rdma { host, port })
            }
            "unix" => {
                if !rest.starts_with('/') {
                    return Err(EndpointError::RelativePath(url.to_string()));
                }
                Ok(Endpoint::Unix {
                    path: PathBuf::from(rest),
                })
            }
            "vsock" => {
                let (cid, port) = split_port(url, rest)?;
                let cid = match cid {
                    "any" | "-1" => VSOCK_CID_ANY,
                    c => c
                        .parse::<u32>()
                        .map_err(|_| EndpointError::BadCid(url.to_string(), c.to_string()))?,
                };
                Ok(Endpoint::Vsock {
                    cid,
                    port: parse_u32(url, port)?,
                })
            }
            "vsock-uds" => {
                if !rest.starts_with('/') {
                    return Err(EndpointError::RelativePath(url.to_string()));
                }
                let (path, port) = split_port(url, rest)?;
                Ok(Endpoint::VsockUds {
                    path: PathBuf::from(path),
                    port: parse_u32(url, port)?,
                })
            }
            other => Err(EndpointError::UnknownScheme(
                url.to_string(),
                other.to_string(),
            )),
        }
    }
}

impl Endpoint {
    /// Builds an endpoint from `--transport T` plus an address; a full URL in `addr` is accepted
    /// as is (and must agree with `transport` when both are given).
    pub fn from_parts(transport: Option<&str>, addr: &str) -> Result<Endpoint, EndpointError> {
        let Some(t) = transport else {
            return addr.parse();
        };
        let scheme = match t {
            "tcp" | "unix" | "vsock" | "vsock-uds" | "rdma" => t,
            other => return Err(EndpointError::UnknownTransport(other.to_string())),
        };
        if let Some((given, _)) = addr.split_once("://") {
            if given != scheme {
                return Err(EndpointError::UnknownScheme(
                    addr.to_string(),
                    format!("{given} (but --transport {scheme})"),
                ));
            }
            return addr.parse();
        }
        format!("{scheme}://{addr}").parse()
    }

    /// The scheme name, e.g. for logs and `--transport`.
    pub fn kind(&self) -> &'static str {
        match self {
            Endpoint::Tcp { .. } => "tcp",
            Endpoint::Unix { .. } => "unix",
            Endpoint::Vsock { .. } => "vsock",
            Endpoint::VsockUds { .. } => "vsock-uds",
            Endpoint::Rdma { .. } => "rdma",
        }
    }
}

fn fmt_host(f: &mut fmt::Formatter<'_>, host: &str) -> fmt::Result {
    if host.contains(':') {
        write!(f, "[{host}]")
    } else {
        write!(f, "{host}")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } => {
                write!(f, "tcp://")?;
                fmt_host(f, host)?;
                write!(f, ":{port}")
            }
            Endpoint::Rdma { host, port } => {
                write!(f, "rdma://")?;
                fmt_host(f, host)?;
                write!(f, ":{port}")
            }
            Endpoint::Unix { path } => write!(f, "unix://{}", path.display()),
            Endpoint::Vsock { cid, port } if *cid == VSOCK_CID_ANY => {
                write!(f, "vsock://any:{port}")
            }
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Endpoint::VsockUds { path, port } => {
                write!(f, "vsock-uds://{}:{port}", path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme_and_round_trips() {
        for url in [
            "tcp://127.0.0.1:7000",
            "tcp://[::1]:7000",
            "tcp://host.example:1",
            "unix:///run/offload.sock",
            "vsock://3:1024",
            "vsock://any:1024",
            "vsock-uds:///tmp/v.sock:52",
            "rdma://10.0.0.1:7471",
        ] {
            let ep: Endpoint = url.parse().unwrap();
            assert_eq!(ep.to_string(), url);
        }
    }

    #[test]
    fn rejects_malformed_with_a_reason() {
        let cases = [
            ("127.0.0.1:7000", "missing scheme"),
            ("ftp://x:1", "unknown scheme"),
            ("tcp://127.0.0.1", "expected HOST:PORT"),
            ("tcp://127.0.0.1:99999", "not a number"),
            ("tcp://:80", "empty host"),
            ("unix://relative.sock", "absolute"),
            ("vsock://x:5", "CID"),
            ("vsock-uds:///tmp/v.sock", "HOST:PORT"),
        ];
        for (url, want) in cases {
            let err = url.parse::<Endpoint>().unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
        }
    }

    #[test]
    fn transport_flag_spelling() {
        assert_eq!(
            Endpoint::from_parts(Some("tcp"), "127.0.0.1:9").unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 9
            }
        );
        assert_eq!(
            Endpoint::from_parts(Some("unix"), "/run/a.sock").unwrap(),
            Endpoint::Unix {
                path: "/run/a.sock".into()
            }
        );
        assert_eq!(
            Endpoint::from_parts(Some("vsock"), "any:5").unwrap(),
            Endpoint::Vsock {
                cid: VSOCK_CID_ANY,
                port: 5
            }
        );
        assert!(Endpoint::from_parts(Some("udp"), "x:1").is_err());
        assert!(Endpoint::from_parts(Some("tcp"), "unix:///x").is_err());
        assert!(Endpoint::from_parts(None, "rdma://1.2.3.4:5").is_ok());
    }
}
