//! Operation limits checked before any resolver runs, parsed documents and
//! their validation reused across requests, and one place that gives every
//! GraphQL error its `extensions.code`.

use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextPrepareRequest,
    NextRequest, NextSubscribe, NextValidation,
};
use async_graphql::parser::types::{
    Directive, ExecutableDocument, FragmentDefinition, OperationDefinition, OperationType,
    Selection, SelectionSet,
};
use async_graphql::registry::{MetaType, MetaTypeName, Registry};
use async_graphql::{
    Name, Positioned, Request, Response, ServerError, ServerResult, ValidationResult, Value,
    Variables,
};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::fast::Plan;
use super::{Caller, HttpGet, SocketAuth};
use crate::app::AppState;
use crate::config::GraphqlConfig;
use crate::error::ApiError;
use crate::input;

pub struct Policy {
    limits: Arc<Limits>,
}

struct Limits {
    max_aliases: usize,
    max_root_fields: usize,
    max_query_bytes: usize,
    max_nesting: usize,
    max_selections: usize,
    /// Documents already parsed and checked, by query text: clients send the
    /// same few queries over and over.
    parsed: moka::sync::Cache<Arc<str>, Arc<Parsed>>,
    /// Automatic persisted queries: query texts that passed the checks, by
    /// tenant and SHA-256 (`<tenant id>:<lowercase hex>`), so that whether a
    /// hash is known tells nothing about other tenants. `None` when off.
    persisted: Option<moka::sync::Cache<Arc<str>, Arc<str>>>,
}

/// The request extension of Apollo's Automatic Persisted Queries.
pub(crate) const PERSISTED_QUERY: &str = "persistedQuery";

/// Set in a response's (never sent) `http_headers` when the request failed
/// before execution: parse, validation, variables or limits. GraphQL over
/// HTTP answers such requests with 4xx and no `data`.
pub(crate) const REQUEST_ERROR: &str = "x-kvql-request-error";

/// A parsed document and the outcome of its successful validations.
struct Parsed {
    doc: ExecutableDocument,
    /// By operation name. Validation depends on the document, the operation
    /// and the variables' values; a result is reused only when the values
    /// certainly fit their declared types (see [`fits`]), so a request gets
    /// exactly the answer a full validation would give.
    validated: Mutex<HashMap<Option<String>, ValidationResult>>,
    /// Its fast-path plan (see `fast`), worked out at its first request
    /// after a validation was remembered.
    plan: OnceLock<Option<Arc<Plan>>>,
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
    pub fn new(config: &GraphqlConfig) -> Policy {
        Policy {
            limits: Arc::new(Limits {
                max_aliases: config.graphql_max_aliases,
                max_root_fields: config.graphql_max_root_fields,
                max_query_bytes: config.graphql_max_query_bytes,
                max_nesting: config.graphql_max_nesting,
                max_selections: config.graphql_max_selections,
                parsed: moka::sync::Cache::builder()
                    .max_capacity(PARSED_CACHE_BYTES)
                    .weigher(|q: &Arc<str>, _| {
                        u32::try_from(q.len()).unwrap_or(u32::MAX).saturating_mul(4)
                    })
                    .build(),
                persisted: (config.graphql_persisted_queries_bytes > 0).then(|| {
                    moka::sync::Cache::builder()
                        .max_capacity(config.graphql_persisted_queries_bytes)
                        .weigher(|key: &Arc<str>, query: &Arc<str>| {
                            // Plus the cache's own bookkeeping per entry.
                            u32::try_from(key.len() + query.len() + 128).unwrap_or(u32::MAX)
                        })
                        .build()
                }),
            }),
        }
    }

    /// The handle through which the HTTP handler finds fast-path plans.
    pub(crate) fn plans(&self) -> Plans {
        Plans(self.limits.clone())
    }
}

/// Fast-path plans of the documents this schema's policy has parsed.
#[derive(Clone)]
pub(crate) struct Plans(Arc<Limits>);

impl Plans {
    /// The plan for `query` run as `operation`, if the document was parsed
    /// and that operation validated by an earlier request, and it has the
    /// shape [`Plan::of`] takes.
    pub(crate) fn get(&self, query: &str, operation: Option<&str>) -> Option<Arc<Plan>> {
        let parsed = self.0.parsed.get(query)?;
        let validated = parsed
            .validated
            .lock()
            .ok()?
            .contains_key(&operation.map(str::to_owned));
        if !validated {
            return None;
        }
        parsed
            .plan
            .get_or_init(|| Plan::of(&parsed.doc).map(Arc::new))
            .clone()
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
    /// Execution began: errors from now on are field errors.
    executed: bool,
}

type Fragments = std::collections::HashMap<Name, Positioned<FragmentDefinition>>;

/// What a selection set amounts to once its fragments are expanded, counted
/// without expanding them: each fragment is counted once and remembered.
#[derive(Clone, Copy, Default)]
struct Size {
    /// Fields, fragment spreads and inline fragments.
    selections: u64,
    aliases: u64,
    /// Fields at the top level of the set (through spreads and inline fragments).
    roots: u64,
    /// Deepest nesting below the set, selection sets and spreads both counting.
    height: usize,
}

impl Size {
    fn add(&mut self, other: Size) {
        self.selections = self.selections.saturating_add(other.selections);
        self.aliases = self.aliases.saturating_add(other.aliases);
        self.roots = self.roots.saturating_add(other.roots);
        self.height = self.height.max(other.height);
    }
}

/// Sizes of fragments, computed once each. The walk's recursion (nested
/// selections plus fragment spreads along one path) is bounded: the text is
/// at most `KVQL_GRAPHQL_MAX_NESTING` deep, and a chain of spreads deeper
/// than [`MAX_SPREAD_DEPTH`] is refused (async-graphql refuses paths deeper
/// than 32 anyway).
struct Sizer<'d> {
    fragments: &'d Fragments,
    done: HashMap<&'d str, Size>,
    in_progress: std::collections::HashSet<&'d str>,
}

const MAX_SPREAD_DEPTH: usize = 64;

fn too_deep() -> String {
    format!("selections and fragment spreads are nested more than {MAX_SPREAD_DEPTH} levels deep")
}

impl<'d> Sizer<'d> {
    fn set(&mut self, set: &'d SelectionSet, depth: usize) -> Result<Size, String> {
        if depth > MAX_SPREAD_DEPTH {
            return Err(too_deep());
        }
        let mut size = Size::default();
        for item in &set.items {
            match &item.node {
                Selection::Field(f) => {
                    let inner = self.set(&f.node.selection_set.node, depth + 1)?;
                    size.add(Size {
                        selections: inner.selections.saturating_add(1),
                        aliases: inner
                            .aliases
                            .saturating_add(u64::from(f.node.alias.is_some())),
                        roots: 1,
                        height: inner.height + 1,
                    });
                }
                Selection::InlineFragment(i) => {
                    let mut inner = self.set(&i.node.selection_set.node, depth + 1)?;
                    inner.selections = inner.selections.saturating_add(1);
                    inner.height += 1;
                    size.add(inner);
                }
                Selection::FragmentSpread(spread) => {
                    let mut inner = self.fragment(&spread.node.fragment_name.node, depth + 1)?;
                    inner.selections = inner.selections.saturating_add(1);
                    inner.height += 1;
                    size.add(inner);
                }
            }
        }
        Ok(size)
    }

    fn fragment(&mut self, name: &'d str, depth: usize) -> Result<Size, String> {
        if let Some(size) = self.done.get(name) {
            // Remembered: the same answer as walking it again at this depth.
            if depth + size.height > MAX_SPREAD_DEPTH {
                return Err(too_deep());
            }
            return Ok(*size);
        }
        // An unknown fragment is left to validation, which names it.
        let Some(fragment) = self.fragments.get(name) else {
            return Ok(Size::default());
        };
        if !self.in_progress.insert(name) {
            return Err(format!("fragment {name} spreads itself"));
        }
        let size = self.set(&fragment.node.selection_set.node, depth)?;
        self.in_progress.remove(name);
        self.done.insert(name, size);
        Ok(size)
    }
}

fn limit_error(message: String) -> ServerError {
    let mut e = ServerError::new(message, None);
    e.extensions
        .get_or_insert_with(Default::default)
        .set("code", "INVALID_INPUT");
    e
}

impl Limits {
    /// The operation limits, on sizes counted without expanding fragments,
    /// so that a small document that would expand to millions of selections
    /// is refused in time linear in its length.
    fn check(&self, doc: &ExecutableDocument, registry: &Registry) -> ServerResult<()> {
        let mut sizer = Sizer {
            fragments: &doc.fragments,
            done: HashMap::new(),
            in_progress: Default::default(),
        };
        // async-graphql walks every operation of the document, expanded.
        let mut total = Size::default();
        let mut most_roots = 0;
        for (_, op) in doc.operations.iter() {
            let size = sizer
                .set(&op.node.selection_set.node, 0)
                .map_err(limit_error)?;
            most_roots = most_roots.max(size.roots);
            total.add(size);
        }
        if total.selections > self.max_selections as u64 {
            return Err(limit_error(format!(
                "the document selects {} fields, fragment spreads and inline fragments \
                 once its fragments are expanded; the limit is {}",
                total.selections, self.max_selections
            )));
        }
        if most_roots > self.max_root_fields as u64 {
            return Err(limit_error(format!(
                "the operation selects {most_roots} top-level fields; the limit is {}",
                self.max_root_fields
            )));
        }
        if total.aliases > self.max_aliases as u64 {
            return Err(limit_error(format!(
                "the document uses {} aliases; the limit is {}",
                total.aliases, self.max_aliases
            )));
        }
        // Fragments no operation uses are still walked by validation.
        for name in doc.fragments.keys() {
            let size = sizer.fragment(name.as_str(), 0).map_err(limit_error)?;
            if size.selections > self.max_selections as u64 {
                return Err(limit_error(format!(
                    "fragment {name} selects {} fields, fragment spreads and inline fragments \
                     once expanded; the limit is {}",
                    size.selections, self.max_selections
                )));
            }
        }
        check_directives(doc, registry).map_err(limit_error)?;
        single_root_field_subscriptions(doc)
    }
}

/// A subscription selects exactly one top-level field, fragments expanded
/// and directives ignored (GraphQL spec 5.2.3.1): one stream per
/// subscription. async-graphql would run the others beside it unchecked,
/// and more narrowly than the spec: it opens a stream per top-level field
/// selection (the same field selected twice runs twice), ignores fragments
/// there (such a stream ends at once, with nothing) and ends a stream whose
/// field is skipped; so the one field must stand directly, once, without
/// `@skip`/`@include` (which the spec's current draft forbids there too).
/// A spread of an unknown fragment is left to validation to report.
fn single_root_field_subscriptions(doc: &ExecutableDocument) -> ServerResult<()> {
    for (name, op) in doc.operations.iter() {
        if op.node.ty != OperationType::Subscription {
            continue;
        }
        let which = || match name {
            Some(n) => format!("subscription {n}"),
            None => "an anonymous subscription".to_owned(),
        };
        let mut names: HashSet<&str> = HashSet::new();
        let mut spread: HashSet<&str> = HashSet::new();
        let mut sets = vec![&op.node.selection_set.node];
        let mut unknown_fragment = false;
        while let Some(set) = sets.pop() {
            for item in &set.items {
                match &item.node {
                    Selection::Field(f) => {
                        names.insert(f.node.response_key().node.as_str());
                    }
                    Selection::InlineFragment(i) => sets.push(&i.node.selection_set.node),
                    Selection::FragmentSpread(s) => {
                        if spread.insert(s.node.fragment_name.node.as_str()) {
                            match doc.fragments.get(&s.node.fragment_name.node) {
                                Some(fragment) => sets.push(&fragment.node.selection_set.node),
                                None => unknown_fragment = true,
                            }
                        }
                    }
                }
            }
        }
        if unknown_fragment {
            continue;
        }
        let refused = if names.len() != 1 {
            Some(format!(
                "{} must select exactly one top-level field; it selects {}",
                which(),
                names.len()
            ))
        } else {
            let items = &op.node.selection_set.node.items;
            match items.first().map(|item| &item.node) {
                Some(Selection::Field(f)) if items.len() == 1 => f
                    .node
                    .directives
                    .iter()
                    .any(|d| matches!(d.node.name.node.as_str(), "skip" | "include"))
                    .then(|| {
                        format!(
                            "the top-level field of {} may not carry @skip or @include",
                            which()
                        )
                    }),
                _ => Some(format!(
                    "{} must select its top-level field directly, once, not through a fragment",
                    which()
                )),
            }
        };
        if let Some(message) = refused {
            let mut e = ServerError::new(message, Some(op.pos));
            e.extensions
                .get_or_insert_with(Default::default)
                .set("code", "INVALID_INPUT");
            return Err(e);
        }
    }
    Ok(())
}

/// Every directive is known, allowed where it stands, and not repeated
/// there unless repeatable (GraphQL spec 5.7). async-graphql's own rules skip
/// some places (`__typename` fields), so all of them are checked here.
fn check_directives(doc: &ExecutableDocument, registry: &Registry) -> Result<(), String> {
    let check = |directives: &[Positioned<Directive>], location: &str| -> Result<(), String> {
        for (i, d) in directives.iter().enumerate() {
            let name = d.node.name.node.as_str();
            let Some(known) = registry.directives.get(name) else {
                return Err(format!("unknown directive @{name}"));
            };
            if !known.locations.iter().any(|l| format!("{l:?}") == location) {
                return Err(format!("directive @{name} may not be used on {location}"));
            }
            if !known.is_repeatable && directives[..i].iter().any(|p| p.node.name.node == name) {
                return Err(format!(
                    "directive @{name} is not repeatable and appears twice on one {location}"
                ));
            }
        }
        Ok(())
    };
    // Iterative: selection sets are nested at most the text's nesting limit,
    // but a walk of untrusted structure never recurses.
    let mut sets: Vec<&SelectionSet> = Vec::new();
    for (_, op) in doc.operations.iter() {
        let location = match op.node.ty {
            OperationType::Query => "QUERY",
            OperationType::Mutation => "MUTATION",
            OperationType::Subscription => "SUBSCRIPTION",
        };
        check(&op.node.directives, location)?;
        for var in &op.node.variable_definitions {
            check(&var.node.directives, "VARIABLE_DEFINITION")?;
        }
        sets.push(&op.node.selection_set.node);
    }
    for fragment in doc.fragments.values() {
        check(&fragment.node.directives, "FRAGMENT_DEFINITION")?;
        sets.push(&fragment.node.selection_set.node);
    }
    while let Some(set) = sets.pop() {
        for item in &set.items {
            match &item.node {
                Selection::Field(f) => {
                    check(&f.node.directives, "FIELD")?;
                    sets.push(&f.node.selection_set.node);
                }
                Selection::FragmentSpread(s) => check(&s.node.directives, "FRAGMENT_SPREAD")?,
                Selection::InlineFragment(i) => {
                    check(&i.node.directives, "INLINE_FRAGMENT")?;
                    sets.push(&i.node.selection_set.node);
                }
            }
        }
    }
    Ok(())
}

/// A GET may only run a query: its answer may be cached and its URL is
/// logged, and a browser may follow a link to it.
fn only_queries(doc: &ExecutableDocument, operation: Option<&str>) -> ServerResult<()> {
    let mut ops = doc.operations.iter();
    let op = match operation {
        Some(name) => ops.find(|(n, _)| n.is_some_and(|n| n.as_str() == name)),
        None => ops.next(),
    };
    match op {
        Some((_, op)) if op.node.ty != OperationType::Query => {
            let mut err = ServerError::new(
                format!(
                    "a {} cannot be sent with GET; send it with POST",
                    op.node.ty
                ),
                None,
            );
            err.extensions
                .get_or_insert_with(Default::default)
                .set("code", "METHOD_NOT_ALLOWED");
            Err(err)
        }
        _ => Ok(()),
    }
}

fn coded(message: &str, code: &str) -> ServerError {
    let mut err = ServerError::new(message, None);
    err.extensions
        .get_or_insert_with(Default::default)
        .set("code", code);
    err
}

impl PolicyExtension {
    /// Apollo's Automatic Persisted Queries: a request may name its query by
    /// SHA-256 hash instead of sending the text, once the text has been sent
    /// with its hash by a caller of the same tenant. Returns the cache key to
    /// remember the text under, once the text has passed every check.
    /// Callers without a valid token neither register nor look up hashes:
    /// their documents (`login` with literal credentials, say) must not be
    /// confirmable by anyone else.
    fn persisted_query(&self, request: &mut Request) -> ServerResult<Option<Arc<str>>> {
        let Some(ext) = request.extensions.remove(PERSISTED_QUERY) else {
            return Ok(None);
        };
        let Some(cache) = &self.limits.persisted else {
            return Err(coded(
                "PersistedQueryNotSupported",
                "PERSISTED_QUERY_NOT_SUPPORTED",
            ));
        };
        let invalid = |m: &str| {
            coded(
                &format!("invalid extensions.persistedQuery: {m}"),
                "INVALID_INPUT",
            )
        };
        let Value::Object(ext) = ext else {
            return Err(invalid("must be an object"));
        };
        if ext.get("version") != Some(&Value::from(1)) {
            return Err(invalid("only `version: 1` is supported"));
        }
        let hash = match ext.get("sha256Hash") {
            Some(Value::String(h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                h.to_ascii_lowercase()
            }
            _ => return Err(invalid("`sha256Hash` must be 64 hexadecimal digits")),
        };
        // Each caller (a user, or an API key: its id negated) has queries of
        // its own, so that a hash answered tells nothing of what anyone
        // else sent, such as a literal password in a mutation.
        let key = request
            .data
            .get(&TypeId::of::<Caller>())
            .and_then(|d| d.downcast_ref::<Caller>())
            .and_then(|c| match c {
                Caller::Authenticated(p) => Some(Arc::<str>::from(format!(
                    "{}:{}:{hash}",
                    p.tenant().get(),
                    p.user_id
                ))),
                _ => None,
            });
        if request.query.is_empty() {
            return match key.and_then(|k| cache.get(&k)) {
                Some(query) => {
                    request.query = query.to_string();
                    Ok(None)
                }
                None => Err(coded("PersistedQueryNotFound", "PERSISTED_QUERY_NOT_FOUND")),
            };
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(request.query.as_bytes());
        let actual: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        if actual != hash {
            return Err(invalid("`sha256Hash` is not the SHA-256 of the query"));
        }
        Ok(key)
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
            if let Some(r) = body.oldest_revision {
                ext.set("oldestRevision", r.to_string());
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

/// A parse error without the lines of query text the parser quotes, which
/// can be as long as the query: the position is in `locations`.
fn without_source_text(mut err: ServerError) -> ServerError {
    let kept: Vec<&str> = err
        .message
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            let quoted = t
                .split_once('|')
                .is_some_and(|(before, _)| before.trim().chars().all(|c| c.is_ascii_digit()));
            !quoted && !t.starts_with("-->")
        })
        .map(|line| line.trim().trim_start_matches("= "))
        .filter(|line| !line.is_empty())
        .collect();
    let mut message = kept.join("; ");
    if message.len() > 300 {
        let mut end = 300;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    err.message = if message.is_empty() {
        "the query is not valid GraphQL".into()
    } else {
        message
    };
    err
}

fn classify_response(mut resp: Response) -> Response {
    resp.errors = resp.errors.into_iter().map(classify).collect();
    resp
}

#[async_graphql::async_trait::async_trait]
impl Extension for PolicyExtension {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let mut resp = classify_response(next.run(ctx).await);
        let executed = self.state.lock().map(|s| s.executed).unwrap_or(true);
        if !executed && !resp.errors.is_empty() {
            resp.http_headers
                .insert(REQUEST_ERROR, poem::http::HeaderValue::from_static("1"));
        }
        resp
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        if let Ok(mut state) = self.state.lock() {
            state.executed = true;
        }
        let mut resp = next.run(ctx, operation_name).await;
        // async-graphql answers `null` for a selection whose fields were all
        // skipped (`{ me @skip(if: true) { username } }`); an operation that
        // ran without error has `data`, an empty object here (spec 6.4.4).
        if resp.data == async_graphql::Value::Null && resp.errors.is_empty() {
            resp.data = async_graphql::Value::Object(Default::default());
        }
        resp
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        next.run(ctx, stream).map(classify_response).boxed()
    }

    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        // On a WebSocket, each operation verifies the connection's token again
        // (the same cached check as an HTTP request), so that a removed user,
        // a changed password or a demotion applies to open sockets as well.
        if let (Some(SocketAuth(token)), Some(state)) =
            (ctx.data_opt::<SocketAuth>(), ctx.data_opt::<AppState>())
        {
            let caller = Caller::from_authorization(state, Some(&format!("Bearer {token}"))).await;
            request = request.data(caller);
        }
        let limits = &self.limits;
        let persisted = self.persisted_query(&mut request)?;
        let query = request.query.as_str();
        if query.len() > limits.max_query_bytes {
            return Err(limit_error(format!(
                "the query text is {} bytes; the limit is {} (pass large values as variables)",
                query.len(),
                limits.max_query_bytes
            )));
        }
        // A document is parsed and its limits checked here, before
        // async-graphql walks it (its depth check expands fragments).
        let cached = limits.parsed.get(query);
        if cached.is_none() {
            input::check_graphql(query, limits.max_nesting)
                .map_err(|e| limit_error(e.to_string()))?;
            let doc = async_graphql::parser::parse_query(query)
                .map_err(|e| without_source_text(ServerError::from(e)))?;
            limits.check(&doc, &ctx.schema_env.registry)?;
            if request.data.contains_key(&TypeId::of::<HttpGet>()) {
                only_queries(&doc, request.operation_name.as_deref())?;
            }
            request.set_parsed_query(doc);
        } else if let Some(parsed) = &cached
            && request.data.contains_key(&TypeId::of::<HttpGet>())
        {
            only_queries(&parsed.doc, request.operation_name.as_deref())?;
        }
        if let (Some(key), Some(cache)) = (persisted, &limits.persisted) {
            cache.insert(key, request.query.as_str().into());
        }
        if let Ok(mut state) = self.state.lock() {
            state.operation.clone_from(&request.operation_name);
            if let Some(parsed) = cached {
                state.reused = parsed.validated(
                    &ctx.schema_env.registry,
                    request.operation_name.as_deref(),
                    &request.variables,
                );
                state.parsed = Some(parsed);
            }
        }
        next.run(ctx, request).await
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let cached = self
            .state
            .lock()
            .ok()
            .and_then(|s| s.parsed.as_ref().map(|p| p.doc.clone()));
        if let Some(doc) = cached {
            return Ok(doc);
        }
        // Parsed and checked in `prepare_request`; async-graphql's own
        // checks run on it now, and only a document that passes them all is
        // remembered.
        let doc = next.run(ctx, query, variables).await?;
        let parsed = Arc::new(Parsed {
            doc: doc.clone(),
            validated: Mutex::new(HashMap::new()),
            plan: OnceLock::new(),
        });
        self.limits.parsed.insert(query.into(), parsed.clone());
        if let Ok(mut state) = self.state.lock() {
            state.parsed = Some(parsed);
        }
        Ok(doc)
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
