//! A retrying object store, in the pattern of object_store's own wrappers
//! (`PrefixStore`, `ThrottledStore`): it wraps any store and retries the
//! requests that failed transiently, with a doubling pause, on top of the
//! HTTP client's own retries. [`retryable`] is the one place that decides
//! what is worth another attempt; blockd's own checks of what came back
//! (size caps, integrity) happen above this layer, so a corrupt or
//! oversize object is reported after one fetch.
//!
//! Streams (listings, deletes of many objects) are not retried here: a
//! listing is retried whole by its caller in `Objects::list`.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Attempts per request (each itself retried by the HTTP client).
pub const ATTEMPTS: u32 = 5;
/// First pause between attempts; doubled each time up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// True when `e` may go away if the request is made again: a failure of
/// the provider or the connection. Answers about the object itself (not
/// found, already exists, precondition, not modified) and refusals
/// (permission, authentication, unsupported) are final.
pub fn retryable(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. })
}

/// Retries transient failures of the wrapped store.
#[derive(Debug)]
pub struct RetryStore {
    inner: Arc<dyn ObjectStore>,
    /// Location name, for the log.
    location: String,
}

impl RetryStore {
    /// Wraps `inner`; `location` names it in log lines.
    pub fn new(inner: Arc<dyn ObjectStore>, location: &str) -> Self {
        Self {
            inner,
            location: location.to_string(),
        }
    }

    async fn retry<T, F, Fut>(&self, op: &'static str, path: &Path, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        run(&self.location, op, path, f).await
    }
}

/// Runs `f` until it succeeds, fails for good ([`retryable`] says no), or
/// runs out of [`ATTEMPTS`]. For requests the wrapper cannot retry by
/// itself (a listing collected whole, a body read after its headers).
///
/// # Errors
/// The last error.
pub async fn run<T, F, Fut>(location: &str, op: &'static str, path: &Path, f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut pause = FIRST_PAUSE;
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if retryable(&e) && attempt < ATTEMPTS => {
                tracing::debug!(location, op, object = %path, attempt, error = %e, "retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
                attempt += 1;
            }
            r => {
                // A missing object is an answer, not a failed request.
                let ok = matches!(&r, Ok(_) | Err(object_store::Error::NotFound { .. }));
                crate::metrics::STATS.store_request(location, op, attempt, ok);
                return r;
            }
        }
    }
}

impl fmt::Display for RetryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RetryStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let bytes = payload.content_length() as u64;
        let r = self
            .retry("put", location, || {
                self.inner.put_opts(location, payload.clone(), opts.clone())
            })
            .await?;
        crate::metrics::STATS.store_bytes(&self.location, "put", bytes);
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let r = self
            .retry("get", location, || {
                self.inner.get_opts(location, options.clone())
            })
            .await?;
        if !options.head {
            crate::metrics::STATS.store_bytes(&self.location, "get", r.range.end - r.range.start);
        }
        Ok(r)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let r = self
            .retry("get", location, || self.inner.get_ranges(location, ranges))
            .await?;
        let bytes = r.iter().map(|b| b.len() as u64).sum();
        crate::metrics::STATS.store_bytes(&self.location, "get", bytes);
        Ok(r)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let p = prefix.cloned().unwrap_or_default();
        self.retry("list", &p, || self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.retry("copy", from, || {
            self.inner.copy_opts(from, to, options.clone())
        })
        .await
    }
}
