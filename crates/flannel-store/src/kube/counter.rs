//! Counts the requests the Kubernetes client sends, by kind, so the API load of an
//! agent can be measured (and exported as metrics by the daemon).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

/// Requests sent to the API server since the store was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiRequestCounts {
    pub get: u64,
    pub list: u64,
    pub watch: u64,
    pub patch: u64,
    pub other: u64,
}

impl ApiRequestCounts {
    pub fn total(&self) -> u64 {
        self.get + self.list + self.watch + self.patch + self.other
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    get: AtomicU64,
    list: AtomicU64,
    watch: AtomicU64,
    patch: AtomicU64,
    other: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ApiRequestCounts {
        ApiRequestCounts {
            get: self.get.load(Ordering::Relaxed),
            list: self.list.load(Ordering::Relaxed),
            watch: self.watch.load(Ordering::Relaxed),
            patch: self.patch.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }

    fn count<B>(&self, req: &http::Request<B>) {
        let watching = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let path = req.uri().path();
        let collection = path.ends_with("/nodes") || path.ends_with("/pods");
        let c = match *req.method() {
            http::Method::GET if watching => &self.watch,
            http::Method::GET if collection => &self.list,
            http::Method::GET => &self.get,
            http::Method::PATCH => &self.patch,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub(crate) struct CountLayer(pub(crate) Arc<Counters>);

impl<S> Layer<S> for CountLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            counters: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Counted<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S, B> Service<http::Request<B>> for Counted<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> S::Future {
        self.counters.count(&req);
        self.inner.call(req)
    }
}
