//! Operation limits checked before any resolver runs, parsed documents and
//! their validation reused across requests, and one place that gives every
//! GraphQL error its `extensions.code`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextPrepareRequest, NextRequest,
    NextSubscribe, NextValidation,
};
use async_graphql::parser::types::{
    ExecutableDocument, FragmentDefinition, OperationDefinition, Selection, SelectionSet,
};
use async_graphql::registry::{MetaType, MetaTypeName, Registry};
use async_graphql::{
    Name, Positioned, Request, Response, ServerError, ServerResult, ValidationResult, Value,
    Variables,
};
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
    parsed: moka::sync::Cache<Arc<str>, Arc<Parsed>>,
}

/// A parsed document and the outcome of its successful validations.
struct Parsed {
    doc: ExecutableDocument,
    /// By operation name. Validation depends on the document, the operation
    /// and the variables' values; a result is reused only when the values
    /// certainly fit their declared types (see [`fits`]), so a request gets
    /// exactly the answer a full validation would give.
    validated: Mutex<HashMap<Option<String>, ValidationResult>>,
}

impl Parsed {
    fn operation(&self, name: Option<&str>) -> Option<&OperationDefinition> {
        let mut ops = self.doc.operations.iter();
        match name {
            Some(name) => ops
                .find(|(n, _)| n.is_some_and(|n| n.as_str() == name))
                .map(|(_, op)| &op.node),
            None => match (ops.next(), ops.next()) {
                (Some((_, op)), None) => Some(&op.node),
                _ => None,
            },
        }
    }

    /// The validation result of an earlier request of `operation`, if these
    /// variables certainly pass validation as well.
    fn validated(
        &self,
        registry: &Registry,
        operation: Option<&str>,
        variables: &Variables,
    ) -> Option<ValidationResult> {
        let result = *self
            .validated
            .lock()
            .ok()?
            .get(&operation.map(str::to_owned))?;
        let op = self.operation(operation)?;
        op.variable_definitions
            .iter()
            .all(|def| match variables.get(&def.node.name.node) {
                // Validation does not look at absent variables either.
                None => true,
                Some(value) => {
                    // A nullable variable with a default may stand where a
                    // non-null value is required, so null must not pass.
                    let mut ty = def.node.var_type.node.to_string();
                    if def.node.default_value.is_some() && !ty.ends_with('!') {
                        ty.push('!');
                    }
                    fits(registry, &ty, value, 0)
                }
            })
            .then_some(result)
    }

    fn remember(&self, operation: Option<String>, result: ValidationResult) {
        if self.operation(operation.as_deref()).is_none() {
            return;
        }
        // Validation checks the variables used in every fragment, even those
        // only other operations spread: such documents are always validated.
        if self.doc.operations.iter().nth(1).is_some() && !self.doc.fragments.is_empty() {
            return;
        }
        if let Ok(mut validated) = self.validated.lock() {
            validated.insert(operation, result);
        }
    }
}

/// Whether `value` is certainly valid for the input type `ty` (`String!`,
/// `[Int]`, an input object...), by the same checks as async-graphql's
/// validation. `false` when in doubt: the request is then fully validated.
fn fits(registry: &Registry, ty: &str, value: &Value, depth: usize) -> bool {
    if depth > 32 {
        return false;
    }
    match MetaTypeName::create(ty) {
        MetaTypeName::NonNull(inner) => {
            !matches!(value, Value::Null) && fits(registry, inner, value, depth + 1)
        }
        MetaTypeName::List(inner) => match value {
            Value::Null => true,
            Value::List(items) => items.iter().all(|v| fits(registry, inner, v, depth + 1)),
            _ => false,
        },
        MetaTypeName::Named(name) => {
            if matches!(value, Value::Null) {
                return true;
            }
            match registry.types.get(name) {
                Some(MetaType::Scalar { is_valid, .. }) => {
                    is_valid.as_ref().is_none_or(|f| f(value))
                }
                Some(MetaType::InputObject {
                    input_fields,
                    oneof: false,
                    ..
                }) => {
                    let Value::Object(fields) = value else {
                        return false;
                    };
                    fields.keys().all(|k| input_fields.contains_key(k.as_str()))
                        && input_fields.values().all(|field| {
                            match fields.get(field.name.as_str()) {
                                Some(v) => fits(registry, &field.ty, v, depth + 1),
                                None => {
                                    field.default_value.is_some()
                                        || !matches!(
                                            MetaTypeName::create(&field.ty),
                                            MetaTypeName::NonNull(_)
                                        )
                                }
                            }
                        })
                }
                _ => false,
            }
        }
    }
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
            state: Mutex::new(RequestState::default()),
        })
    }
}

struct PolicyExtension {
    limits: Arc<Limits>,
    state: Mutex<RequestState>,
}

/// What the hooks of one request pass on to each other, in the order
/// async-graphql calls them: prepare_request, parse_query, validation.
#[derive(Default)]
struct RequestState {
    operation: Option<String>,
    parsed: Option<Arc<Parsed>>,
    /// An earlier validation of this document and operation that holds for
    /// this request.
    reused: Option<ValidationResult>,
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
            if let ApiError::RateLimited { retry_after, .. } = api {
                ext.set("retryAfter", Value::from(*retry_after));
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
        let parsed = match limits.parsed.get(query) {
            Some(parsed) => parsed,
            None => {
                let doc = next.run(ctx, query, variables).await?;
                limits.check(&doc)?;
                let parsed = Arc::new(Parsed {
                    doc,
                    validated: Mutex::new(HashMap::new()),
                });
                limits.parsed.insert(query.into(), parsed.clone());
                parsed
            }
        };
        let doc = parsed.doc.clone();
        if let Ok(mut state) = self.state.lock() {
            state.reused = parsed.validated(
                &ctx.schema_env.registry,
                state.operation.as_deref(),
                variables,
            );
            state.parsed = Some(parsed);
        }
        Ok(doc)
    }

    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        if let Ok(mut state) = self.state.lock() {
            state.operation.clone_from(&request.operation_name);
        }
        next.run(ctx, request).await
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        if let Some(result) = self.state.lock().ok().and_then(|mut s| s.reused.take()) {
            return Ok(result);
        }
        let result = next.run(ctx).await?;
        if let Ok(mut state) = self.state.lock()
            && let Some(parsed) = state.parsed.take()
        {
            parsed.remember(state.operation.take(), result);
        }
        Ok(result)
    }
}
