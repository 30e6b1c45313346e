//! The fast path: the most common read, one `object(key:)` with plain
//! fields, answered without async-graphql's executor.
//!
//! A document is answered here only once async-graphql has run it in full
//! and its validation was remembered (see `policy`), so every check that
//! depends on the document has already passed. A request is answered here
//! only if nothing about it could make the executor answer differently: an
//! authenticated caller, exactly the declared variable with a string value,
//! no request extensions. Anything else, and any error (a bad key, a store
//! failure), goes to the executor, which answers it as always. The values
//! come from `types::KvObject::field_value`, next to the resolvers.

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationType, Selection, SelectionSet,
};
use async_graphql::{Name, Response, Value, indexmap::IndexMap};
use async_graphql_value::Value as AstValue;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::store::Key;

use super::types::{KvObject, KvObjectField};

/// `query [Name][($var: String!)] { [alias:] object(key: $var | "literal") { field... } }`,
/// each field a plain `KvObject` field under its response key.
#[derive(Debug)]
pub(crate) struct Plan {
    operation: Option<Name>,
    alias: Name,
    key: KeyArg,
    fields: Vec<(Name, KvObjectField)>,
}

#[derive(Debug)]
enum KeyArg {
    Variable(Name),
    Literal(String),
}

/// Selections a plan answers at most: larger ones are left to the executor.
const MAX_FIELDS: usize = 16;

impl Plan {
    /// The plan of `doc`, if it has that shape exactly: one query, no
    /// fragments, no directives, no other argument or variable.
    pub(crate) fn of(doc: &ExecutableDocument) -> Option<Plan> {
        if !doc.fragments.is_empty() {
            return None;
        }
        let (operation, op) = match &doc.operations {
            DocumentOperations::Single(op) => (None, op),
            DocumentOperations::Multiple(ops) if ops.len() == 1 => {
                let (name, op) = ops.iter().next()?;
                (Some(name.clone()), op)
            }
            DocumentOperations::Multiple(_) => return None,
        };
        let op = &op.node;
        if op.ty != OperationType::Query || !op.directives.is_empty() {
            return None;
        }
        let [root] = plain_fields(&op.selection_set.node)?[..] else {
            return None;
        };
        if root.name.node != "object" || !root.directives.is_empty() {
            return None;
        }
        let [(arg, value)] = &root.arguments[..] else {
            return None;
        };
        if arg.node != "key" {
            return None;
        }
        let key = match (&value.node, &op.variable_definitions[..]) {
            (AstValue::Variable(used), [def])
                if def.node.name.node == *used
                    && def.node.directives.is_empty()
                    && def.node.default_value.is_none()
                    && def.node.var_type.node.to_string() == "String!" =>
            {
                KeyArg::Variable(used.clone())
            }
            (AstValue::String(text), []) => KeyArg::Literal(text.clone()),
            _ => return None,
        };
        let mut fields = Vec::new();
        for field in plain_fields(&root.selection_set.node)? {
            if !field.arguments.is_empty()
                || !field.directives.is_empty()
                || !field.selection_set.node.items.is_empty()
            {
                return None;
            }
            let response_key = field.response_key().node.clone();
            // The same response key twice is merged by the executor.
            if fields.iter().any(|(k, _)| *k == response_key) || fields.len() == MAX_FIELDS {
                return None;
            }
            fields.push((response_key, KvObjectField::of(&field.name.node)?));
        }
        if fields.is_empty() {
            return None;
        }
        Some(Plan {
            operation,
            alias: root.response_key().node.clone(),
            key,
            fields,
        })
    }

    /// The answer to `request`, or the failed read the executor should
    /// answer from; `None` when the executor must answer on its own.
    pub(crate) async fn run(
        &self,
        state: &AppState,
        principal: &Principal,
        request: &async_graphql::Request,
    ) -> Option<Fast> {
        // Without `operationName` async-graphql runs the document's only
        // operation, which is this one.
        let named = request.operation_name.as_deref();
        if !request.extensions.0.is_empty()
            || named.is_some_and(|n| Some(n) != self.operation.as_deref())
        {
            return None;
        }
        let key = match &self.key {
            KeyArg::Literal(text) if request.variables.is_empty() => text.clone(),
            KeyArg::Variable(name) if request.variables.len() == 1 => {
                match request.variables.get(name)? {
                    async_graphql::Value::String(text) => text.clone(),
                    _ => return None,
                }
            }
            _ => return None,
        };
        let key = Key::parse(key).ok()?;
        let found = match state.store().get(principal.read_scope(), &key).await {
            Ok(found) => found,
            Err(error) => return Some(Fast::Executor(Some(Prefetched { key, error }))),
        };
        state.metrics().graphql_fast_path();
        let object = match found {
            None => Value::Null,
            Some(object) => {
                let object = KvObject(object);
                let mut map = IndexMap::with_capacity(self.fields.len());
                for (name, field) in &self.fields {
                    map.insert(name.clone(), object.field_value(*field));
                }
                Value::Object(map)
            }
        };
        let mut data = IndexMap::with_capacity(1);
        data.insert(self.alias.clone(), object);
        Some(Fast::Answer(Response::new(Value::Object(data))))
    }
}

/// What the fast path made of a request.
pub(crate) enum Fast {
    Answer(Response),
    /// The executor answers, with the failed read if there was one.
    Executor(Option<Prefetched>),
}

/// A read of `key` the fast path made and the store refused, in the data
/// of the request it hands to the executor: `Query::object` answers it
/// instead of reading again (once is enough for a store already failing,
/// and metrics count one read).
pub(crate) struct Prefetched {
    pub key: Key,
    pub error: ApiError,
}

/// The fields of `set`, if it holds nothing else.
fn plain_fields(set: &SelectionSet) -> Option<Vec<&async_graphql::parser::types::Field>> {
    set.items
        .iter()
        .map(|item| match &item.node {
            Selection::Field(f) => Some(&f.node),
            _ => None,
        })
        .collect()
}
