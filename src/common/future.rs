//! The boxed future behind every `dyn` async interface (transports, token sources, sinks).

use std::future::Future;
use std::pin::Pin;

/// A boxed, `Send` future, so async methods can sit behind `dyn Trait`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
