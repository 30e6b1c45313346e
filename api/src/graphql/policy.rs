//! Operation limits checked before any resolver runs, and one place that
//! gives every GraphQL error its `extensions.code`.

use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextRequest, NextSubscribe,
};
use async_graphql::parser::types::{
    ExecutableDocument, FragmentDefinition, OperationDefinition, Selection, SelectionSet,
};
use async_graphql::{Name, Positioned, Response, ServerError, ServerResult, Value, Variables};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::error::ApiError;

pub struct Policy {
    limits: Arc<Limits>,
}

struct Limits {
    max_aliases: usize,
    max_root_fields: usize,
    max_query_bytes: usize,
    /// Documents already parsed and checked, by query text: clients send the
    /// same few queries over and over.
    parsed: moka::sync::Cache<Arc<str>, ExecutableDocument>,
}

/// Bytes of query text whose parsed documents are kept.
const PARSED_CACHE_BYTES: u64 = 4 * 1024 * 1024;

impl Policy {
    pub fn new(max_aliases: usize, max_root_fields: usize, max_query_bytes: usize) -> Policy {
        Policy {
            limits: Arc::new(Limits {
                max_aliases,
                max_root_fields,
                max_query_bytes,
                parsed: moka::sync::Cache::builder()
                    .max_capacity(PARSED_CACHE_BYTES)
                    .weigher(|q: &Arc<str>, _| {
                        u32::try_from(q.len()).unwrap_or(u32::MAX).saturating_mul(4)
                    })
                    .build(),
            }),
        }
    }
}

impl ExtensionFactory for Policy {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(PolicyExtension {
            limits: self.limits.clone(),
        })
    }
}

struct PolicyExtension {
    limits: Arc<Limits>,
}

type Fragments = std::collections::HashMap<Name, Positioned<FragmentDefinition>>;

fn count_aliases(set: &SelectionSet, fragments: &Fragments, depth: usize) -> usize {
    if depth > 64 {
        return 0;
    }
    set.items
        .iter()
        .map(|s| match &s.node {
            Selection::Field(f) => {
                usize::from(f.node.alias.is_some())
                    + count_aliases(&f.node.selection_set.node, fragments, depth + 1)
            }
            Selection::InlineFragment(i) => {
                count_aliases(&i.node.selection_set.node, fragments, depth + 1)
            }
            Selection::FragmentSpread(spread) => fragments
                .get(&spread.node.fragment_name.node)
                .map(|f| count_aliases(&f.node.selection_set.node, fragments, depth + 1))
                .unwrap_or(0),
        })
        .sum()
}

fn count_root_fields(set: &SelectionSet, fragments: &Fragments, depth: usize) -> usize {
    if depth > 64 {
        return 0;
    }
    set.items
        .iter()
        .map(|s| match &s.node {
            Selection::Field(_) => 1,
            Selection::InlineFragment(i) => {
                count_root_fields(&i.node.selection_set.node, fragments, depth + 1)
            }
            Selection::FragmentSpread(spread) => fragments
                .get(&spread.node.fragment_name.node)
                .map(|f| count_root_fields(&f.node.selection_set.node, fragments, depth + 1))
                .unwrap_or(0),
        })
        .sum()
}

fn limit_error(message: String) -> ServerError {
    let mut e = ServerError::new(message, None);
    e.extensions
        .get_or_insert_with(Default::default)
        .set("code", "INVALID_INPUT");
    e
}

impl Limits {
    fn check(&self, doc: &ExecutableDocument) -> ServerResult<()> {
        let operations: Vec<&Positioned<OperationDefinition>> =
            doc.operations.iter().map(|(_, op)| op).collect();
        for op in &operations {
            let roots = count_root_fields(&op.node.selection_set.node, &doc.fragments, 0);
            if roots > self.max_root_fields {
                return Err(limit_error(format!(
                    "the operation selects {roots} top-level fields; the limit is {}",
                    self.max_root_fields
                )));
            }
        }
        let aliases: usize = operations
            .iter()
            .map(|op| count_aliases(&op.node.selection_set.node, &doc.fragments, 0))
            .sum();
        if aliases > self.max_aliases {
            return Err(limit_error(format!(
                "the document uses {aliases} aliases; the limit is {}",
                self.max_aliases
            )));
        }
        Ok(())
    }
}

/// Gives an error its code and safe message: from the `ApiError` it came
/// from, else `INVALID_INPUT` (parse and validation errors, limits).
fn classify(mut err: ServerError) -> ServerError {
    let api = err
        .source
        .as_ref()
        .and_then(|s| s.downcast_ref::<ApiError>());
    let ext = err.extensions.get_or_insert_with(Default::default);
    match api {
        Some(api) => {
            let body = api.body();
            ext.set("code", body.code.as_str());
            if let Some(f) = &body.field {
                ext.set("field", f.as_str());
            }
            if let Some(i) = body.index {
                ext.set("index", Value::from(i));
            }
            if let Some(k) = &body.key {
                ext.set("key", k.as_str());
            }
            if let Some(id) = &body.request_id {
                ext.set("requestId", id.as_str());
            }
            err.message = body.error;
        }
        None => {
            if ext.get("code").is_none() {
                ext.set("code", "INVALID_INPUT");
            }
        }
    }
    err
}

fn classify_response(mut resp: Response) -> Response {
    resp.errors = resp.errors.into_iter().map(classify).collect();
    resp
}

#[async_graphql::async_trait::async_trait]
impl Extension for PolicyExtension {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        classify_response(next.run(ctx).await)
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        next.run(ctx, stream).map(classify_response).boxed()
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let limits = &self.limits;
        if query.len() > limits.max_query_bytes {
            return Err(limit_error(format!(
                "the query text is {} bytes; the limit is {} (pass large values as variables)",
                query.len(),
                limits.max_query_bytes
            )));
        }
        if let Some(doc) = limits.parsed.get(query) {
            return Ok(doc);
        }
        let doc = next.run(ctx, query, variables).await?;
        limits.check(&doc)?;
        limits.parsed.insert(query.into(), doc.clone());
        Ok(doc)
    }
}
