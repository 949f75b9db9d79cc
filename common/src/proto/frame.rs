//! Framing: one JSON document and a newline, at most [`MAX_FRAME`] bytes.

use serde::{Deserialize, Serialize};

/// The longest frame either side accepts, newline included.
pub const MAX_FRAME: usize = 1 << 20;

/// Errors of encoding or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame exceeds [`MAX_FRAME`].
    #[error("control message longer than {MAX_FRAME} bytes")]
    TooLong,
    /// The peer closed before a full frame arrived.
    #[error("control message ended without a newline")]
    Truncated,
    /// The frame is not the JSON expected.
    #[error("malformed control message: {0}")]
    Malformed(#[source] serde_json::Error),
}

/// Encodes one message as a frame: compact JSON and a newline.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail: no maps with non-string keys.
    let mut out = serde_json::to_vec(msg).unwrap_or_default();
    out.push(b'\n');
    out
}

/// One frame as it arrives, chunk by chunk: the one reading of a frame, for the daemon
/// (which reads a request and the descriptors sent with it) and for the client (which
/// reads the answer).
#[derive(Debug, Default)]
pub struct FrameReader {
    /// What arrived so far: up to and with the newline, or past [`MAX_FRAME`].
    frame: Vec<u8>,
}

impl FrameReader {
    /// Takes the next chunk the peer sent. Returns whether the frame is over (its
    /// newline came, or more than [`MAX_FRAME`] bytes did): read no more. Bytes after the
    /// newline are not part of it.
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        if let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            self.frame
                .extend_from_slice(chunk.get(..=end).unwrap_or_default());
            return true;
        }
        self.frame.extend_from_slice(chunk);
        self.frame.len() > MAX_FRAME
    }

    /// The frame read: too long, cut short (the peer stopped, or reading ended, before
    /// its newline), or the message it carries.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<T, FrameError> {
        if self.frame.len() > MAX_FRAME {
            Err(FrameError::TooLong)
        } else if self.frame.last() != Some(&b'\n') {
            Err(FrameError::Truncated)
        } else {
            decode(&self.frame)
        }
    }
}

/// Decodes one frame (with or without its newline).
pub fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> Result<T, FrameError> {
    if frame.len() > MAX_FRAME {
        return Err(FrameError::TooLong);
    }
    let body = frame.strip_suffix(b"\n").unwrap_or(frame);
    serde_json::from_slice(body).map_err(FrameError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Request;

    #[test]
    fn malformed_and_oversized_frames_are_refused() {
        assert!(matches!(
            decode::<Request>(b"garbage\n"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Request>(br#"{"request":"promote"}"#),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Request>(br#"{"request":"status","extra":1}"#),
            Err(FrameError::Malformed(_))
        ));
        let big = vec![b' '; MAX_FRAME + 1];
        assert!(matches!(decode::<Request>(&big), Err(FrameError::TooLong)));
    }

    #[test]
    fn a_frame_is_read_to_its_newline() {
        let status = encode(&Request::Status {});
        let (head, tail) = status.split_at(3);
        let mut reader = FrameReader::default();
        assert!(!reader.push(head));
        assert!(matches!(
            reader.decode::<Request>(),
            Err(FrameError::Truncated)
        ));
        // What follows the newline is not part of the frame.
        assert!(reader.push(&[tail, b"garbage"].concat()));
        assert_eq!(
            reader.decode::<Request>().expect("decodes"),
            Request::Status {}
        );

        let mut reader = FrameReader::default();
        assert!(!reader.push(&vec![b' '; MAX_FRAME]));
        assert!(reader.push(b"  "));
        assert!(matches!(
            reader.decode::<Request>(),
            Err(FrameError::TooLong)
        ));
        // A newline past the limit does not make it shorter.
        let mut reader = FrameReader::default();
        assert!(reader.push(&[vec![b' '; MAX_FRAME], b"\n".to_vec()].concat()));
        assert!(matches!(
            reader.decode::<Request>(),
            Err(FrameError::TooLong)
        ));
    }
}
