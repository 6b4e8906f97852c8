//! The login token on the wire: `authorization: Bearer <token>` on every call.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Sends `authorization: Bearer <token>` on every call once a token is set; sends nothing
/// by default (an open pool).
#[derive(Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

/// A token that cannot go in a gRPC header.
#[derive(Debug, thiserror::Error)]
#[error("the token is not a valid header value (printable ASCII only)")]
pub struct BadToken;

impl Auth {
    /// Sends `token` (from `Login`) with every call.
    pub fn bearer(token: &str) -> Result<Auth, BadToken> {
        let v = format!("Bearer {token}").parse().map_err(|_| BadToken)?;
        Ok(Auth(Some(v)))
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_in_the_authorization_header() {
        let mut auth = Auth::bearer("abc").unwrap();
        let r = auth.call(Request::new(())).unwrap();
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer abc");
        let r = Auth::default().call(Request::new(())).unwrap();
        assert!(r.metadata().get("authorization").is_none());
        assert!(Auth::bearer("bad\ntoken").is_err());
    }
}
