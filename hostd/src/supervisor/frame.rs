//! Framing of the control channel between `hostd` and a VM's process: a little-endian
//! u32 length, then a protobuf message. A pure codec: [`decode`] takes what has arrived so
//! far and answers "not yet" (`Ok(None)`) for an incomplete frame.

use prost::Message;

/// Frames larger than this are refused (a console chunk or a metrics reply is far less).
pub const MAX_FRAME: usize = 4 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame does not decode")]
    Decode(#[source] prost::DecodeError),
}

pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Takes one message off the front of `buf` if a whole frame is there.
pub fn decode<M: Message + Default>(buf: &mut Vec<u8>) -> Result<Option<M>, FrameError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(head.try_into().expect("four bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let msg = M::decode(&buf[4..4 + len]).map_err(FrameError::Decode)?;
    buf.drain(..4 + len);
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::protocol::{Command, command};

    #[test]
    fn partial_frames_are_not_yet_and_whole_ones_decode_in_order() {
        let a = Command {
            id: 1,
            op: Some(command::Op::ConsoleInput(b"ls\n".to_vec())),
        };
        let b = Command {
            id: 2,
            op: Some(command::Op::Pause(Default::default())),
        };
        let mut wire = encode(&a);
        wire.extend(encode(&b));
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.push(byte);
            while let Some(m) = decode::<Command>(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![a, b]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        assert!(matches!(
            decode::<Command>(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        let mut buf = vec![3, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode::<Command>(&mut buf),
            Err(FrameError::Decode(_))
        ));
    }
}
