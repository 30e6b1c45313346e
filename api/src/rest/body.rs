//! JSON request bodies parsed with serde, so that every error names the field
//! at fault (`ttl: invalid type: floating point 1.5, expected i64`), while the
//! OpenAPI schema still comes from the type's `Object` derive.

use poem::{FromRequest, Request, RequestBody};
use poem_openapi::registry::{MetaMediaType, MetaRequest, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde::de::DeserializeOwned;

use crate::app::AppState;
use crate::error::ApiError;
use crate::input;

const CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// Implements `Deserialize` for request structs from a JSON object only.
/// serde's derive also reads a struct from an array of its fields in order,
/// so that `[null, null]` would pass for `{"data": null, "ttl": null}`;
/// request bodies are documented as objects, and anything else is refused
/// (400 `INVALID_INPUT`). Each struct keeps its derive with
/// `#[serde(remote = "Self")]`, which this wraps.
macro_rules! objects_only {
    ($($ty:ty),* $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl<'de> serde::de::Visitor<'de> for Visitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a JSON object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> Result<$ty, A::Error> {
                        <$ty>::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                deserializer.deserialize_map(Visitor)
            }
        }
    )*};
}
pub(crate) use objects_only;

/// A required JSON body of type `T`.
pub struct JsonBody<T>(pub T);

/// Parses JSON bytes into `T` after checking their nesting and integers
/// (see [`input::check_json`]); errors name the path of the offending field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8], max_depth: usize) -> Result<T, ApiError> {
    input::check_json(bytes, max_depth, "request body")?;
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("the body is not valid JSON: {inner}")
        } else {
            inner.to_string()
        };
        let field = (path != "." && !path.is_empty()).then_some(path);
        ApiError::InvalidInput { field, message }
    })?;
    // One JSON value and nothing after it but whitespace.
    de.end().map_err(|e| ApiError::InvalidInput {
        field: None,
        message: format!("the body is not valid JSON: {e}"),
    })?;
    Ok(value)
}

impl<'a, T: Type + DeserializeOwned + Send> ApiExtractor<'a> for JsonBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: CONTENT_TYPE,
                schema: T::schema_ref(),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        if !request.content_type().is_some_and(crate::headers::is_json) {
            return Err(ApiError::UnsupportedMediaType(
                "the request body must be JSON, sent with `Content-Type: application/json`".into(),
            )
            .into());
        }
        let max_depth = request
            .data::<AppState>()
            .map_or(input::DEFAULT_MAX_DEPTH, |s| s.config().max_json_depth);
        let bytes = <Vec<u8> as FromRequest>::from_request(request, body).await?;
        Ok(JsonBody(parse(&bytes, max_depth)?))
    }
}

/// A JSON response body written ahead of time, documented as `T`. Used where
/// the stored JSON text can be passed through without parsing it.
pub struct RawJson<T> {
    body: String,
    _schema: std::marker::PhantomData<fn() -> T>,
}

impl<T> RawJson<T> {
    pub fn new(body: String) -> Self {
        RawJson {
            body,
            _schema: std::marker::PhantomData,
        }
    }
}

impl<T: Type> poem_openapi::payload::Payload for RawJson<T> {
    const CONTENT_TYPE: &'static str = CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        crate::headers::is_json(content_type)
    }

    fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Send> poem::IntoResponse for RawJson<T> {
    fn into_response(self) -> poem::Response {
        poem::Response::builder()
            .content_type(CONTENT_TYPE)
            .body(self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Item {
        key: String,
        ttl: Option<i64>,
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse::<Item>(br#"{"key": "k", "ttl": 1.5}"#, 64).unwrap_err();
        assert_eq!(err.field(), Some("ttl"));
        let err = parse::<Vec<Item>>(br#"[{"key": "k"}, {"key": 3}]"#, 64).unwrap_err();
        assert_eq!(err.field(), Some("[1].key"));
        let err = parse::<Item>(br#"{"ttl": 1}"#, 64).unwrap_err();
        assert!(err.to_string().contains("missing field `key`"), "{err}");
        let err = parse::<Item>(br#"{"key": "#, 64).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn nothing_but_whitespace_may_follow_the_value() {
        assert!(parse::<Item>(b"{\"key\": \"k\"} \r\n\t", 64).is_ok());
        let err = parse::<Vec<Item>>(b"[]e\x1e\xff]", 64).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        for body in [&b"{\"key\": \"k\"}{}"[..], b"{\"key\": \"k\"} x"] {
            let err = parse::<Item>(body, 64).unwrap_err();
            assert!(err.to_string().contains("not valid JSON"), "{err}");
        }
    }
}
