//! Counts GraphQL operations by type and their errors by code for
//! `/metrics`, on every transport (HTTP and WebSocket). Registered before
//! the policy extension, so it sees every operation (the policy answers
//! repeated documents from its cache without parsing them again) and the
//! errors with their codes set.

use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextPrepareRequest, NextRequest,
    NextSubscribe,
};
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType};
use async_graphql::{Request, Response, ServerResult, Variables};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::metrics::Metrics;

pub struct Observe(pub Metrics);

impl ExtensionFactory for Observe {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(ObserveExtension {
            metrics: self.0.clone(),
            operation_name: Mutex::new(None),
        })
    }
}

struct ObserveExtension {
    metrics: Metrics,
    /// The request's `operationName`, to find its operation in the document.
    operation_name: Mutex<Option<String>>,
}

fn count_errors(metrics: &Metrics, resp: &Response) {
    for err in &resp.errors {
        let code = err
            .extensions
            .as_ref()
            .and_then(|e| e.get("code"))
            .and_then(|v| match v {
                async_graphql::Value::String(s) => Some(s.as_str()),
                _ => None,
            });
        metrics.graphql_error(code);
    }
}

/// The type of the operation a request runs, if the document says.
fn operation_type(doc: &ExecutableDocument, name: Option<&str>) -> Option<OperationType> {
    match (&doc.operations, name) {
        (DocumentOperations::Single(op), _) => Some(op.node.ty),
        (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name).map(|op| op.node.ty),
        (DocumentOperations::Multiple(_), None) => None,
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for ObserveExtension {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let resp = next.run(ctx).await;
        count_errors(&self.metrics, &resp);
        resp
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        let metrics = self.metrics.clone();
        next.run(ctx, stream)
            .map(move |resp| {
                count_errors(&metrics, &resp);
                resp
            })
            .boxed()
    }

    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        if let Ok(mut name) = self.operation_name.lock() {
            name.clone_from(&request.operation_name);
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
        let doc = next.run(ctx, query, variables).await?;
        let name = self.operation_name.lock().ok().and_then(|n| n.clone());
        self.metrics
            .graphql_operation(operation_type(&doc, name.as_deref()));
        Ok(doc)
    }
}
