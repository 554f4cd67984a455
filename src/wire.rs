//! Server-side wire types that let one encoding serve many sessions.
//!
//! A change reaches every session that follows its service. Encoding the same update once per
//! session would cost O(sessions × update size) of CPU on the control plane (a 10,000-backend
//! snapshot to 1,000 reconnecting SDKs is gigabytes of protobuf encoding). Instead, the
//! control plane encodes each update once, keeps the bytes (`Bytes`, reference counted), and
//! sends [`Outbound::Encoded`] to every session: encoding it is a copy of the shared bytes into
//! the HTTP/2 frame buffer, which happens anyway.
//!
//! [`Outbound`] implements [`prost::Message`] by hand with exactly the wire format of
//! `dlb.v1.ServerMessage`, so clients decode a plain [`proto::ServerMessage`]. The Discovery
//! service is generated a second time ([`discovery_server`]) with `Outbound` as its response
//! type; everything else is the normal generated code.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::proto;

/// An outbound `dlb.v1.ServerMessage`: either encoded once and shared, or built for one session.
// `Message` is larger than `Encoded` (the policy's health check, outlier and panic settings made
// `ServerMessage` larger), but both are short-lived items of a bounded queue; boxing would add an
// allocation to every per-session message for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// The complete encoding of a `ServerMessage` (see [`Outbound::encode_shared`]).
    Encoded(Bytes),
    /// A message for one session.
    Message(proto::ServerMessage),
}

impl Default for Outbound {
    fn default() -> Self {
        Self::Message(proto::ServerMessage::default())
    }
}

impl Outbound {
    /// Encodes `message` once, for sharing across sessions.
    pub fn encode_shared(message: &proto::ServerMessage) -> Bytes {
        Bytes::from(message.encode_to_vec())
    }
}

impl Message for Outbound {
    fn encode_raw(&self, buf: &mut impl BufMut)
    where
        Self: Sized,
    {
        match self {
            Self::Encoded(bytes) => buf.put_slice(bytes),
            Self::Message(m) => m.encode_raw(buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError>
    where
        Self: Sized,
    {
        // Never decoded by the server; decoding works anyway (into a plain message).
        if let Self::Encoded(bytes) = self {
            let m = proto::ServerMessage::decode(bytes.clone())?;
            *self = Self::Message(m);
        }
        match self {
            Self::Message(m) => m.merge_field(tag, wire_type, buf, ctx),
            Self::Encoded(_) => Ok(()),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Self::Encoded(bytes) => bytes.len(),
            Self::Message(m) => m.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The Discovery service's server side, with [`Outbound`] as its response message.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    dead_code
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/shared/dlb.v1.rs"));
}

pub use generated::discovery_server;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_encoding_is_a_server_message() {
        let msg = proto::ServerMessage {
            kind: Some(proto::server_message::Kind::Update(proto::ServiceUpdate {
                service: "web".into(),
                nonce: "n1".into(),
                full: true,
                upserts: vec![proto::Server {
                    server_id: "a".into(),
                    address: "10.0.0.1:80".into(),
                    weight: 3,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        let shared = Outbound::Encoded(Outbound::encode_shared(&msg));
        let plain = Outbound::Message(msg.clone());
        assert_eq!(shared.encoded_len(), plain.encoded_len());
        let bytes = shared.encode_to_vec();
        assert_eq!(bytes, plain.encode_to_vec());
        assert_eq!(
            proto::ServerMessage::decode(bytes.as_slice()).expect("decodes"),
            msg
        );
    }
}
