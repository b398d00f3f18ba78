//! The controller's error type, and the one place where errors become HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_model::api::{ErrorBody, ErrorDetail};
use shoal_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Capacity(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The controller's disk is full: nothing was changed; reads still work.
    #[error("{0}")]
    StorageFull(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn not_found(kind: &'static str, name: impl Into<String>) -> ApiError {
        ApiError::NotFound {
            kind,
            name: name.into(),
        }
    }

    pub fn exists(kind: &'static str, name: impl Into<String>) -> ApiError {
        ApiError::AlreadyExists {
            kind,
            name: name.into(),
        }
    }

    /// An I/O failure of the controller's own: 507 when its disk is full, else internal.
    pub fn from_io(what: impl std::fmt::Display, e: std::io::Error) -> ApiError {
        if is_disk_full(&e) {
            ApiError::StorageFull(format!(
                "the controller's disk is full: {what}: {e}; nothing was stored"
            ))
        } else {
            ApiError::Internal(format!("{what}: {e}"))
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::AlreadyExists { .. } => (StatusCode::CONFLICT, "already_exists"),
            ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ApiError::InUse(_) => (StatusCode::CONFLICT, "in_use"),
            ApiError::Capacity(_) => (StatusCode::CONFLICT, "insufficient_capacity"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            ApiError::Store(StoreError::Io { source, .. }) if is_disk_full(source) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            ApiError::Store(_) | ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// Whether an I/O error says the disk (or the quota) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

impl From<shoal_model::NameError> for ApiError {
    fn from(e: shoal_model::NameError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<shoal_model::GuestError> for ApiError {
    fn from(e: shoal_model::GuestError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<shoal_model::ha::HaError> for ApiError {
    fn from(e: shoal_model::ha::HaError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<shoal_model::SizeError> for ApiError {
    fn from(e: shoal_model::SizeError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: self.to_string(),
            },
        };
        (status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_507_and_other_io_errors_500() {
        let full = std::io::Error::from_raw_os_error(28);
        let e = ApiError::Store(StoreError::Io {
            path: "/d/state/wal".into(),
            source: full,
        });
        assert_eq!(
            e.status_and_code(),
            (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
        );
        let other = ApiError::Store(StoreError::Io {
            path: "/d/state/wal".into(),
            source: std::io::Error::from_raw_os_error(5),
        });
        assert_eq!(other.status_and_code().0, StatusCode::INTERNAL_SERVER_ERROR);
        let image: ApiError = shoal_image::Error::Io("writing chunk".into(), std::io::ErrorKind::StorageFull).into();
        assert_eq!(image.status_and_code().0, StatusCode::INSUFFICIENT_STORAGE);
        assert!(image.to_string().contains("disk is full"), "{image}");
        let upload = ApiError::from_io("writing /d/t.partial", std::io::Error::from_raw_os_error(28));
        assert_eq!(upload.status_and_code().0, StatusCode::INSUFFICIENT_STORAGE);
        assert!(upload.to_string().contains("/d/t.partial"), "{upload}");
    }
}
