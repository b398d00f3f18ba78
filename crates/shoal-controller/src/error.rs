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
            ApiError::Store(_) | ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<shoal_model::NameError> for ApiError {
    fn from(e: shoal_model::NameError) -> Self {
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
