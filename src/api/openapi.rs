//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers'
//! `#[utoipa::path]` annotations and the response types.
//!
//! `GET /openapi.json` serves it, and `docs/openapi.json` contains a committed
//! copy that `tests/openapi.rs` keeps equal to the generated one.

use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, Required, Tag};
use utoipa::{Modify, OpenApi, PartialSchema, ToResponse, ToSchema};

use super::problem::{FieldError, ProblemBody};
use super::{events, history, webhooks};
use crate::domain::catalogue::EVENTS;
use crate::domain::payload::PING_EVENT;
use crate::store::{ErrorKind, Trigger, status};

// The `security(...)` of each `#[utoipa::path]` repeats these names as
// literals, and `tests/openapi.rs` checks that both sides match.
/// Name of the security scheme of business API keys.
const BUSINESS_API_KEY: &str = "businessApiKey";
/// Name of the security scheme of producer tokens.
const PRODUCER_TOKEN: &str = "producerToken";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "citapro-webhooks",
        description = "Webhook management, delivery history and event intake of the CitaPro \
booking platform.\n\nEvery error is an RFC 9457 problem details object \
(`application/problem+json`). A method that a path does not support is `405`, \
and a path that does not exist is `404`."
    ),
    paths(
        webhooks::list_webhooks,
        webhooks::create_webhook,
        webhooks::get_webhook,
        webhooks::update_webhook,
        webhooks::delete_webhook,
        history::list_deliveries,
        history::get_delivery,
        history::redeliver,
        history::send_test,
        history::recover,
        events::accept_event,
        super::health,
        super::ready,
        super::render_metrics,
        serve_openapi,
    ),
    components(
        schemas(ProblemBody, FieldError),
        responses(
            BadRequest,
            Unauthorized,
            NotFound,
            Conflict,
            PayloadTooLarge,
            UnprocessableContent,
            InternalServerError,
            ServiceUnavailable,
        )
    ),
    modifiers(&SecuritySchemes, &Tags)
)]
struct ApiDoc;

/// Builds the OpenAPI document of the whole API.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Renders the OpenAPI document as pretty-printed JSON with a trailing
/// newline, the form of `docs/openapi.json`.
pub fn openapi_json() -> String {
    let mut text = openapi_document()
        .to_pretty_json()
        .expect("the OpenAPI document serializes to JSON");
    text.push('\n');
    text
}

/// Serves this OpenAPI document
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object))
)]
pub(super) async fn serve_openapi() -> Response {
    static DOCUMENT: LazyLock<String> = LazyLock::new(openapi_json);
    let mut response = DOCUMENT.as_str().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let api_key = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("cpk_ followed by 64 hex characters")
            .description(Some(
                "A business's API key, created with \
                 `citapro-webhooks api-key create --business <uuid>`.",
            ))
            .build();
        components.add_security_scheme(BUSINESS_API_KEY, SecurityScheme::Http(api_key));
        let producer_token = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("cpt_ followed by 64 hex characters")
            .description(Some(
                "A producer token, created with \
                 `citapro-webhooks producer-token create --name <label>` or given to \
                 `serve --producer-token`. A business API key is not a producer token.",
            ))
            .build();
        components.add_security_scheme(PRODUCER_TOKEN, SecurityScheme::Http(producer_token));
    }
}

struct Tags;

impl Modify for Tags {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let tags = [
            (
                "webhooks",
                "Webhook endpoints of the business that owns the API key.",
            ),
            (
                "deliveries",
                "Delivery history of one webhook and operator actions on it.",
            ),
            ("events", "Event intake from the booking platform."),
            (
                "service",
                "Health, metrics and this document, without authentication.",
            ),
        ];
        openapi.tags = Some(
            tags.into_iter()
                .map(|(name, description)| {
                    let mut tag = Tag::new(name);
                    tag.description = Some(description.to_owned());
                    tag
                })
                .collect(),
        );
    }
}

/// Builds a string schema that allows only `values`.
fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .description(Some(description))
        .into()
}

/// Builds the schema of a query parameter that also allows an empty value,
/// which the handler treats as if the parameter were left out.
pub(super) fn or_empty(schema: impl Into<RefOr<Schema>>) -> RefOr<Schema> {
    let empty = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([""]));
    AnyOfBuilder::new().item(schema).item(empty).into()
}

/// Builds a reference to the component schema of `T`.
pub(super) fn schema_ref<T: ToSchema>() -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(T::name()))
}

/// Builds an optional query parameter.
pub(super) fn optional_query(name: &str, description: &str, schema: RefOr<Schema>) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

/// One of the documented event names that webhooks subscribe to.
pub struct EventName;

impl PartialSchema for EventName {
    fn schema() -> RefOr<Schema> {
        string_enum(
            EVENTS.iter().map(|event| event.name),
            "One of the documented event names.",
        )
    }
}

impl ToSchema for EventName {}

/// An event name that a delivery can carry: a documented event, or the
/// `webhook.ping` of a test.
pub struct DeliveryEventName;

impl PartialSchema for DeliveryEventName {
    fn schema() -> RefOr<Schema> {
        let names = EVENTS.iter().map(|event| event.name).chain([PING_EVENT]);
        string_enum(
            names,
            "A documented event name, or `webhook.ping` for a test delivery.",
        )
    }
}

impl ToSchema for DeliveryEventName {}

/// The state of a delivery.
pub struct DeliveryStatus;

impl PartialSchema for DeliveryStatus {
    fn schema() -> RefOr<Schema> {
        string_enum(
            [
                status::PENDING,
                status::SUCCEEDED,
                status::FAILED,
                status::CANCELLED,
            ],
            "`pending` until an attempt succeeds (`succeeded`) or the retries run out \
             (`failed`). `cancelled` when its webhook was deactivated first.",
        )
    }
}

impl ToSchema for DeliveryStatus {}

/// The reason for an attempt.
pub struct AttemptTrigger;

impl PartialSchema for AttemptTrigger {
    fn schema() -> RefOr<Schema> {
        string_enum(
            [Trigger::Automatic, Trigger::Manual, Trigger::Test].map(Trigger::as_str),
            "`automatic` for the first attempt and its retries, `manual` for a \
             redelivery, `test` for a test ping.",
        )
    }
}

impl ToSchema for AttemptTrigger {}

/// The reason that an attempt failed.
pub struct AttemptErrorKind;

impl PartialSchema for AttemptErrorKind {
    fn schema() -> RefOr<Schema> {
        let kinds = [
            ErrorKind::Timeout,
            ErrorKind::Connect,
            ErrorKind::Tls,
            ErrorKind::DestinationNotAllowed,
            ErrorKind::HttpStatus,
        ];
        string_enum(
            kinds.map(ErrorKind::as_str),
            "The reason that the attempt failed. `http_status` means that the endpoint \
             responded with a status other than 2xx.",
        )
    }
}

impl ToSchema for AttemptErrorKind {}

// The error responses below exist only to describe each error once in the
// document. The handlers return `ApiError`, which renders them.

/// The body is not valid JSON, or a history cursor is malformed or belongs to another webhook.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code)]
pub struct BadRequest(ProblemBody<'static>);

/// The `Authorization` header has no bearer token, or the token is unknown.
#[derive(ToResponse)]
#[response(
    content_type = "application/problem+json",
    headers(("WWW-Authenticate" = String, description = "Always `Bearer`."))
)]
#[allow(dead_code)]
pub struct Unauthorized(ProblemBody<'static>);

/// The business has no such webhook or delivery. A malformed id is not found either.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code)]
pub struct NotFound(ProblemBody<'static>);

/// The webhook is inactive. Activate it before recovering its deliveries.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code)]
pub struct Conflict(ProblemBody<'static>);

/// The body is larger than this endpoint accepts.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code)]
pub struct PayloadTooLarge(ProblemBody<'static>);

/// The body is valid JSON but not an object, or has unknown or invalid fields, or a query parameter is invalid.
///
/// `errors` names every invalid field. A value that matches the request
/// schema can still be invalid here, because some rules need more than a
/// schema: the host of a webhook URL, the limit of 100 webhooks per
/// business, the types of an entity's tracked fields, an `until` later than
/// `since`, and the stored state that an update without `previous` needs.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code)]
pub struct UnprocessableContent(ProblemBody<'static>);

/// The request could not be completed. Try again later. The body contains no internal details.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code)]
pub struct InternalServerError(ProblemBody<'static>);

/// The service is not ready: the database is unreachable, or the delivery workers stopped.
#[derive(ToResponse)]
#[response(content_type = "application/problem+json")]
#[allow(dead_code)]
pub struct ServiceUnavailable(ProblemBody<'static>);
