//! `dlb.v1.XdsStatus`: the read-only RPC behind `dlbctl xds-clients`, a translation of
//! [`XdsClients::list`] into the wire types (bounded: at most [`MAX_CLIENTS`] streams and
//! [`MAX_NAMES`] names per resource type; names and type URLs escaped, at most 256 bytes; and
//! at most [`MAX_LIST_BYTES`] in all, so the answer never exceeds the message size however
//! many names the clients subscribed to: the streams that do not fit are counted in `total`).

use std::sync::Arc;

use dlb::proto;
use dlb::proto::xds_status_server::{XdsStatus, XdsStatusServer};

use super::clients::{escaped, ClientState, XdsClients};

/// Most streams listed in one response.
pub const MAX_CLIENTS: usize = 10_000;
/// Most names listed per resource type.
pub const MAX_NAMES: usize = 100;
/// Most bytes of streams in one response.
pub const MAX_LIST_BYTES: usize = dlb::model::MAX_LIST_BYTES;

/// The `XdsStatus` service over the registry of connected xDS clients.
#[derive(Debug, Clone)]
pub struct XdsStatusService {
    clients: Arc<XdsClients>,
}

impl XdsStatusService {
    /// A service listing `clients`.
    pub fn new(clients: Arc<XdsClients>) -> Self {
        Self { clients }
    }

    /// The tonic server for this service, with DLB's message size bounds.
    pub fn into_server(self) -> XdsStatusServer<Self> {
        XdsStatusServer::new(self)
            .max_decoding_message_size(dlb::model::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(dlb::model::MAX_MESSAGE_BYTES)
    }
}

fn to_wire(c: ClientState) -> proto::XdsClient {
    proto::XdsClient {
        stream: c.stream,
        protocol: c.protocol.to_owned(),
        peer: c.peer,
        node_id: c.node_id,
        user_agent: c.user_agent,
        locality: c.locality,
        types: c
            .types
            .into_iter()
            .map(|(type_url, t)| proto::XdsResourceType {
                type_url: escaped(&type_url, 256),
                names_total: u32::try_from(t.names.len()).unwrap_or(u32::MAX),
                names: t
                    .names
                    .iter()
                    .take(MAX_NAMES)
                    .map(|n| escaped(n, 256))
                    .collect(),
                wildcard: t.wildcard,
                sent_version: t.sent_version,
                sent_nonce: t.sent_nonce,
                acked_version: t.acked_version,
                acked_nonce: t.acked_nonce,
                responses: t.responses,
                nacks: t.nacks,
                last_nack: t.last_nack.map(|n| proto::XdsNack {
                    version: n.version,
                    nonce: n.nonce,
                    message: n.message,
                    at_unix_ms: n
                        .at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                }),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl XdsStatus for XdsStatusService {
    async fn list_xds_clients(
        &self,
        _: tonic::Request<proto::ListXdsClientsRequest>,
    ) -> Result<tonic::Response<proto::ListXdsClientsResponse>, tonic::Status> {
        let all = self.clients.list();
        let total = all.len();
        let listed = crate::listing::first_that_fit(
            total,
            all.into_iter().take(MAX_CLIENTS).map(to_wire),
            0,
        );
        Ok(tonic::Response::new(proto::ListXdsClientsResponse {
            clients: listed.items,
            truncated: listed.truncated,
            total: listed.total,
        }))
    }
}
