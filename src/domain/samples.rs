//! Realistic sample snapshots of each entity, for `trigger` and the docs.

use serde_json::{Value, json};

use super::catalogue::EventType;

/// Returns `(previous, new)` snapshots of an entity, differing in a few
/// tracked fields and one untracked field.
pub fn sample_states(entity: &str, business_id: &str) -> (Value, Value) {
    match entity {
        "booking" => (
            json!({
                "startTime": "2026-04-01 14:00:00", "endTime": "2026-04-01 15:00:00",
                "status": "pending", "internalNote": null, "clientNote": "Primera visita",
                "payment_status": null, "isFromWeb": true, "isFromAgent": false, "isFromApi": false,
                "amount": 50.0, "clientId": "550e8400-e29b-41d4-a716-446655440001",
                "locationId": "550e8400-e29b-41d4-a716-446655440002",
                "serviceId": "550e8400-e29b-41d4-a716-446655440003",
                "personId": "550e8400-e29b-41d4-a716-446655440004", "paymentId": null,
                "businessAccountId": business_id, "notifyClient": true,
                "lastUpdatedBy": null, "repeatGroupId": null
            }),
            json!({
                "startTime": "2026-04-01 14:00:00", "endTime": "2026-04-01 15:00:00",
                "status": "confirmed", "internalNote": null, "clientNote": "Primera visita",
                "payment_status": "paid", "isFromWeb": true, "isFromAgent": false, "isFromApi": false,
                "amount": 75.0, "clientId": "550e8400-e29b-41d4-a716-446655440001",
                "locationId": "550e8400-e29b-41d4-a716-446655440002",
                "serviceId": "550e8400-e29b-41d4-a716-446655440003",
                "personId": "550e8400-e29b-41d4-a716-446655440004", "paymentId": null,
                "businessAccountId": business_id, "notifyClient": false,
                "lastUpdatedBy": null, "repeatGroupId": null
            }),
        ),
        "client" => (
            json!({
                "firstname": "María", "lastname": "Núñez", "email": "maria@example.com",
                "phone": "+34 600 000 001", "docType": "DNI", "docNumber": "12345678Z",
                "birthdate": "1990-05-17", "address": null, "city": "Sevilla",
                "state": null, "country": "ES"
            }),
            json!({
                "firstname": "María", "lastname": "Núñez Ortega", "email": "maria.nunez@example.com",
                "phone": "+34 600 000 001", "docType": "DNI", "docNumber": "12345678Z",
                "birthdate": "1990-05-17", "address": "Calle Feria 12", "city": "Sevilla",
                "state": null, "country": "ES"
            }),
        ),
        "service" => (
            json!({
                "name": "Corte de pelo", "duration": 30, "domiciliary": false, "virtual": false,
                "status": "active", "showInMinisite": true, "price": 19.99,
                "categoryId": "550e8400-e29b-41d4-a716-446655440010",
                "description": null, "sessions": null, "simultaneous": 1
            }),
            json!({
                "name": "Corte de pelo", "duration": 45, "domiciliary": false, "virtual": false,
                "status": "active", "showInMinisite": true, "price": 24.5,
                "categoryId": "550e8400-e29b-41d4-a716-446655440010",
                "description": "Incluye lavado", "sessions": null, "simultaneous": 1
            }),
        ),
        "person" => (
            json!({
                "locationId": "550e8400-e29b-41d4-a716-446655440002", "firstName": "Lucía",
                "lastName": "Gómez", "specialty": null, "email": "lucia@example.com",
                "status": "active", "showInMinisite": true, "phone": null, "address": null,
                "idType": null, "idNumber": null, "birthdate": null, "userId": null
            }),
            json!({
                "locationId": "550e8400-e29b-41d4-a716-446655440002", "firstName": "Lucía",
                "lastName": "Gómez", "specialty": "Colorista", "email": "lucia@example.com",
                "status": "active", "showInMinisite": false, "phone": "+34 600 000 002",
                "address": null, "idType": null, "idNumber": null, "birthdate": null, "userId": null
            }),
        ),
        "custom_field" => (
            json!({
                "name": "Alergias", "fieldType": "select", "required": false,
                "options": ["Ninguna", "Látex"], "sortOrder": 1, "showInMinisite": 1,
                "requiredInMinisite": 0, "showInIaAgent": 0, "requiredInIaAgent": 0
            }),
            json!({
                "name": "Alergias", "fieldType": "select", "required": true,
                "options": ["Ninguna", "Látex", "Níquel"], "sortOrder": 1, "showInMinisite": 1,
                "requiredInMinisite": 1, "showInIaAgent": 0, "requiredInIaAgent": 0
            }),
        ),
        _ => (
            json!({
                "name": "Vacaciones", "startTime": "2026-08-01 00:00:00",
                "endTime": "2026-08-15 23:59:59",
                "locationId": "550e8400-e29b-41d4-a716-446655440002", "repetition": null,
                "providers": ["550e8400-e29b-41d4-a716-446655440004"]
            }),
            json!({
                "name": "Vacaciones de verano", "startTime": "2026-08-01 00:00:00",
                "endTime": "2026-08-20 23:59:59",
                "locationId": "550e8400-e29b-41d4-a716-446655440002",
                "repetition": {"frequency": "yearly", "interval": 1},
                "providers": ["550e8400-e29b-41d4-a716-446655440004"]
            }),
        ),
    }
}

/// Builds a producer request body for a sample event.
pub fn sample_request(event: &EventType, business_id: &str, aggregate_id: &str) -> Value {
    let (previous, new) = sample_states(event.entity.name, business_id);
    let mut request = json!({
        "event": event.name,
        "business_account_id": business_id,
        "aggregate_id": aggregate_id,
        "data": new,
    });
    if event.is_update() {
        request["previous"] = previous;
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalogue::EVENTS;
    use crate::domain::changes::check_tracked_types;

    #[test]
    fn samples_have_documented_types() {
        for event in &EVENTS {
            let request = sample_request(event, "b", "a");
            for key in ["data", "previous"] {
                if let Some(Value::Object(snapshot)) = request.get(key) {
                    let errors = check_tracked_types(event.entity, snapshot);
                    assert!(errors.is_empty(), "{} {key}: {errors:?}", event.name);
                }
            }
        }
    }
}
