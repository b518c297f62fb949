//! API errors, rendered as RFC 9457 problem details in one place.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::StoreError;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, ToSchema)]
pub struct FieldError {
    /// The field's name, with dots for nested keys and indexes for array
    /// items (`data.amount`, `events[2]`). `body` when the body is not an object.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An error response of the API.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    pub errors: Vec<FieldError>,
}

/// An RFC 9457 problem details object, the body of every error response.
#[derive(Serialize, ToSchema)]
#[schema(as = Problem)]
pub(super) struct ProblemBody<'a> {
    /// Always `about:blank`: the status code alone identifies the problem.
    #[serde(rename = "type")]
    #[schema(examples("about:blank"))]
    problem_type: &'static str,
    /// The standard reason phrase of the status code.
    title: &'a str,
    /// The HTTP status code of the response.
    status: u16,
    /// A description of what failed, for the developer who made the request.
    detail: &'a str,
    /// Every invalid field, present on `422` validation errors only.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    errors: Option<&'a [FieldError]>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token in the Authorization header",
        )
    }

    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, detail)
    }

    /// A `422` that names every invalid field.
    pub fn validation(errors: Vec<FieldError>) -> ApiError {
        let detail = errors
            .iter()
            .map(|error| format!("{}: {}", error.field, error.message))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail,
            errors,
        }
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request could not be completed; try again later",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::NoPreviousState(id) => ApiError::validation(vec![FieldError::new(
                "previous",
                format!(
                    "is required: no earlier state of aggregate {id} is stored to compute changes from"
                ),
            )]),
            StoreError::WebhookLimit(limit) => ApiError::validation(vec![FieldError::new(
                "url",
                format!(
                    "cannot be added: the business already has the maximum of {limit} webhooks"
                ),
            )]),
            StoreError::Backend(error) => {
                tracing::error!(error = %format!("{error:#}"), "store operation failed");
                ApiError::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = ProblemBody {
            problem_type: "about:blank",
            title,
            status: self.status.as_u16(),
            detail: &self.detail,
            errors: (!self.errors.is_empty()).then_some(self.errors.as_slice()),
        };
        let mut response = (self.status, Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
