//! One TCP connection to a portal before the full feature phase: connect, and send and
//! receive whole PDUs one at a time, each wait bounded. Login and discovery run on it;
//! a normal session then hands its socket and any bytes already read to the engine.

use std::time::Duration;

use bytes::BytesMut;
use iscsi_pdu::PduError;
use iscsi_pdu::bhs::Header;
use iscsi_pdu::frame::{self, FrameConfig, RawPdu};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a connection stopped being usable.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect to {portal}")]
    Connect {
        portal: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket error")]
    Io(#[source] std::io::Error),
    #[error("the target closed the connection")]
    Closed,
    #[error("malformed PDU from the target")]
    Pdu(#[source] PduError),
    #[error("protocol violation by the target: {reason}")]
    Protocol { reason: String },
    #[error("{what} took longer than {after:?}")]
    Timeout { what: &'static str, after: Duration },
}

impl ConnError {
    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        Self::Protocol {
            reason: reason.into(),
        }
    }
}

/// A connection in the login or discovery phase.
#[derive(Debug)]
pub(crate) struct Framed {
    pub stream: TcpStream,
    /// Bytes read but not yet decoded.
    pub rx: BytesMut,
    /// Framing of what we receive.
    pub rx_cfg: FrameConfig,
    /// Framing of what we send.
    pub tx_cfg: FrameConfig,
}

impl Framed {
    /// Connects within `limit`, with TCP_NODELAY set (every PDU is a request that waits
    /// for an answer).
    pub async fn connect(portal: &str, limit: Duration) -> Result<Self, ConnError> {
        let stream = match tokio::time::timeout(limit, TcpStream::connect(portal)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(ConnError::Connect {
                    portal: portal.to_owned(),
                    source,
                });
            }
            Err(_) => {
                return Err(ConnError::Timeout {
                    what: "TCP connect",
                    after: limit,
                });
            }
        };
        stream.set_nodelay(true).map_err(ConnError::Io)?;
        Ok(Self {
            stream,
            rx: BytesMut::with_capacity(64 * 1024),
            rx_cfg: FrameConfig::default(),
            tx_cfg: FrameConfig::default(),
        })
    }

    /// Sends one PDU, waiting at most until `deadline` for the socket to take it.
    pub async fn send(
        &mut self,
        header: &Header,
        data: &[u8],
        deadline: tokio::time::Instant,
        limit: Duration,
    ) -> Result<(), ConnError> {
        let mut out = Vec::with_capacity(64 + data.len());
        frame::encode(header, &[], data, &self.tx_cfg, &mut out).map_err(ConnError::Pdu)?;
        match tokio::time::timeout_at(deadline, self.stream.write_all(&out)).await {
            Ok(r) => r.map_err(ConnError::Io),
            Err(_) => Err(ConnError::Timeout {
                what: "sending a PDU",
                after: limit,
            }),
        }
    }

    /// Receives one PDU, waiting at most until `deadline`.
    pub async fn recv(
        &mut self,
        deadline: tokio::time::Instant,
        what: &'static str,
        limit: Duration,
    ) -> Result<RawPdu, ConnError> {
        loop {
            if let Some(pdu) = frame::decode(&mut self.rx, &self.rx_cfg).map_err(ConnError::Pdu)? {
                return Ok(pdu);
            }
            self.rx.reserve(16 * 1024);
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rx));
            match read.await {
                Ok(Ok(0)) => return Err(ConnError::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ConnError::Io(e)),
                Err(_) => return Err(ConnError::Timeout { what, after: limit }),
            }
        }
    }
}
