//! Wire types of the change feed: `/api/changes`, `/api/watch` and key
//! history. Change entries are written as JSON text with the stored value
//! passed through, like objects (`object_view_json`).

use std::fmt::Write;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use poem::web::sse::SSE;
use poem::{IntoResponse, Response};
use poem_openapi::payload::Payload;
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Enum, Object};

use super::JsonValue;
use crate::error::ApiError;
use crate::store::events::EventKind;
use crate::store::{self, Change};

/// What a change did.
#[derive(Enum)]
#[oai(rename_all = "UPPERCASE")]
pub enum ChangeKind {
    /// A value was created or replaced.
    Put,
    /// A client deleted the value.
    Delete,
    /// The value expired and the sweeper removed it.
    Expire,
}

pub fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Put => "PUT",
        EventKind::Delete => "DELETE",
        EventKind::Expire => "EXPIRE",
    }
}

/// One committed change of your data.
#[derive(Object)]
pub struct ChangeView {
    /// Strictly increasing across all your keys, in commit order (there may
    /// be gaps). Resume after it.
    pub revision: i64,
    /// PUT, DELETE or EXPIRE.
    pub kind: ChangeKind,
    /// The key changed.
    pub key: String,
    /// The version written (PUT), or the version deleted or expired.
    pub version: i64,
    /// The value written, for PUT; null otherwise.
    #[oai(nullable)]
    pub data: Option<JsonValue>,
}

/// `c` as the JSON of [`ChangeView`].
pub fn change_json(c: &Change) -> String {
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut out = String::with_capacity(c.data.as_deref().map_or(0, str::len) + c.key.len() + 96);
    let _ = write!(
        out,
        "{{\"revision\":{},\"kind\":\"{}\",\"key\":{},\"version\":{},\"data\":{}}}",
        c.revision,
        kind_name(c.kind),
        quoted(&c.key),
        c.version,
        c.data.as_deref().unwrap_or("null")
    );
    out
}

/// Changes in revision order.
#[derive(Object)]
pub struct ChangePageView {
    /// The changes after `after`, in revision order.
    pub changes: Vec<ChangeView>,
    /// Pass as `after` next. When every change up to now was read, it is
    /// your data's latest revision, so changes to other keys are not read
    /// again.
    pub last_revision: i64,
}

pub fn change_page_json(page: &store::ChangePage) -> String {
    let entries: Vec<String> = page.changes.iter().map(change_json).collect();
    format!(
        "{{\"changes\":[{}],\"last_revision\":{}}}",
        entries.join(","),
        page.last_revision
    )
}

/// A key's changes, newest first.
#[derive(Object)]
pub struct HistoryPageView {
    /// The key's retained changes, newest first.
    pub changes: Vec<ChangeView>,
    /// Pass as `cursor` for older changes; null on the last page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

pub fn history_page_json(page: &store::HistoryPage) -> String {
    let entries: Vec<String> = page.changes.iter().map(change_json).collect();
    let next = match page.next {
        Some(r) => format!("\"{}\"", r.get()),
        None => "null".into(),
    };
    format!(
        "{{\"changes\":[{}],\"next_cursor\":{next}}}",
        entries.join(",")
    )
}

/// One message of `/api/watch`: a change, or the error that ends the stream.
pub enum WatchItem {
    Change(Change),
    Error(ApiError),
}

impl WatchItem {
    /// The Server-Sent Event: `id:` the revision, `event:` the kind, `data:`
    /// the change as in `/api/changes`; `event: error` with the error body.
    pub fn into_event(self) -> poem::web::sse::Event {
        use poem::web::sse::Event;
        match self {
            WatchItem::Change(c) => Event::message(change_json(&c))
                .id(c.revision.to_string())
                .event_type(kind_name(c.kind)),
            WatchItem::Error(e) => {
                Event::message(serde_json::to_string(&e.body()).unwrap_or_default())
                    .event_type("error")
            }
        }
    }
}

/// `/api/watch`'s answer: Server-Sent Events, with a comment line every
/// `heartbeat` while nothing happens (`KVQL_WATCH_HEARTBEAT`), so that
/// proxies keep an idle stream open and both ends notice a dead one. The
/// OpenAPI document describes one event, as OpenAPI before 3.2 reads a
/// `text/event-stream` schema.
pub struct WatchStream {
    pub events: BoxStream<'static, WatchItem>,
    pub heartbeat: std::time::Duration,
}

/// One Server-Sent Event of `/api/watch`.
#[derive(Object)]
struct WatchEvent {
    /// The change's revision; absent on `error`.
    id: Option<String>,
    /// The kind of change, or `error`: then `data` is the error body and
    /// the stream ends.
    event: WatchEventType,
    /// The change as JSON text: one entry of `/api/changes`' `changes`.
    data: String,
}

/// What a `/api/watch` event carries.
#[derive(Enum)]
enum WatchEventType {
    #[oai(rename = "PUT")]
    Put,
    #[oai(rename = "DELETE")]
    Delete,
    #[oai(rename = "EXPIRE")]
    Expire,
    #[oai(rename = "error")]
    Error,
}

impl Payload for WatchStream {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn schema_ref() -> MetaSchemaRef {
        WatchEvent::schema_ref()
    }

    fn register(registry: &mut Registry) {
        WatchEvent::register(registry);
    }
}

impl IntoResponse for WatchStream {
    fn into_response(self) -> Response {
        SSE::new(self.events.map(WatchItem::into_event))
            .keep_alive(self.heartbeat)
            .into_response()
    }
}

impl ApiResponse for WatchStream {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "The changes, as they are committed.",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: Self::CONTENT_TYPE,
                    schema: Self::schema_ref(),
                }],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        WatchEvent::register(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn change(kind: EventKind, data: Option<&str>) -> Change {
        Change {
            revision: 12,
            kind,
            key: "a \"b\"/ü".into(),
            version: 3,
            data: data.map(Arc::from),
            expires_at: None,
            created_at: None,
            at: 0,
        }
    }

    #[test]
    fn change_entries_pass_the_value_through_and_escape_the_key() {
        let put: serde_json::Value = serde_json::from_str(&change_json(&change(
            EventKind::Put,
            Some(r#"{"x":[1,2]}"#),
        )))
        .unwrap();
        assert_eq!(
            put,
            serde_json::json!({"revision": 12, "kind": "PUT", "key": "a \"b\"/ü", "version": 3, "data": {"x": [1, 2]}})
        );
        let gone: serde_json::Value =
            serde_json::from_str(&change_json(&change(EventKind::Expire, None))).unwrap();
        assert_eq!(gone["kind"], "EXPIRE");
        assert_eq!(gone["data"], serde_json::Value::Null);
    }
}
