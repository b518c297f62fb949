//! The catalogue of documented events and the tracked fields of each entity.
//!
//! This table is the single source for event names, the entity each event
//! belongs to, and the fields whose changes `*.updated` events report.

/// The JSON type a tracked field must have in an entity snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    NullableString,
    /// Any JSON number.
    Number,
    /// A JSON number written without fraction or exponent (`60`, not `60.0`).
    Integer,
    NullableInteger,
    Boolean,
    NullableArray,
    NullableObject,
    StringArray,
}

impl FieldType {
    /// Describes the type as the public reference writes it.
    pub fn describe(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::NullableString => "string | null",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::NullableInteger => "integer | null",
            FieldType::Boolean => "boolean",
            FieldType::NullableArray => "array | null",
            FieldType::NullableObject => "object | null",
            FieldType::StringArray => "string[]",
        }
    }
}

/// A field whose change is reported in `data.changes`.
#[derive(Debug, Clone, Copy)]
pub struct TrackedField {
    /// The key used in `data.changes`.
    pub name: &'static str,
    /// The key of the value in the entity snapshot. It differs from
    /// `name` only for the booking's payment status (`payment_status`).
    pub snapshot_key: &'static str,
    pub field_type: FieldType,
}

/// An entity whose changes produce events.
#[derive(Debug)]
pub struct Entity {
    pub name: &'static str,
    pub tracked_fields: &'static [TrackedField],
}

/// A documented event name and the entity it describes.
#[derive(Debug)]
pub struct EventType {
    pub name: &'static str,
    pub entity: &'static Entity,
}

impl EventType {
    /// Tells whether payloads of this event carry `data.changes`.
    pub fn is_update(&self) -> bool {
        self.name.ends_with(".updated")
    }

    /// Tells whether this event removes the entity.
    pub fn is_deletion(&self) -> bool {
        self.name.ends_with(".deleted")
    }
}

const fn field(name: &'static str, field_type: FieldType) -> TrackedField {
    TrackedField {
        name,
        snapshot_key: name,
        field_type,
    }
}

use FieldType::*;

pub static BOOKING: Entity = Entity {
    name: "booking",
    tracked_fields: &[
        field("startTime", String),
        field("endTime", String),
        field("status", String),
        field("internalNote", NullableString),
        field("clientNote", NullableString),
        TrackedField {
            name: "paymentStatus",
            snapshot_key: "payment_status",
            field_type: NullableString,
        },
        field("amount", Number),
        field("clientId", String),
        field("locationId", String),
        field("serviceId", String),
        field("personId", NullableString),
        field("paymentId", NullableString),
    ],
};

pub static CLIENT: Entity = Entity {
    name: "client",
    tracked_fields: &[
        field("firstname", String),
        field("lastname", String),
        field("email", String),
        field("phone", String),
        field("docType", NullableString),
        field("docNumber", NullableString),
        field("birthdate", NullableString),
        field("address", NullableString),
        field("city", NullableString),
        field("state", NullableString),
        field("country", NullableString),
    ],
};

pub static SERVICE: Entity = Entity {
    name: "service",
    tracked_fields: &[
        field("name", String),
        field("duration", Integer),
        field("domiciliary", Boolean),
        field("virtual", Boolean),
        field("status", String),
        field("showInMinisite", Boolean),
        field("price", Number),
        field("categoryId", String),
        field("description", NullableString),
        field("sessions", NullableInteger),
        field("simultaneous", NullableInteger),
    ],
};

pub static PERSON: Entity = Entity {
    name: "person",
    tracked_fields: &[
        field("locationId", String),
        field("firstName", String),
        field("lastName", String),
        field("specialty", NullableString),
        field("email", String),
        field("status", String),
        field("showInMinisite", Boolean),
        field("phone", NullableString),
        field("address", NullableString),
        field("idType", NullableString),
        field("idNumber", NullableString),
        field("birthdate", NullableString),
        field("userId", NullableString),
    ],
};

pub static CUSTOM_FIELD: Entity = Entity {
    name: "custom_field",
    tracked_fields: &[
        field("name", String),
        field("fieldType", String),
        field("required", Boolean),
        field("options", NullableArray),
        field("sortOrder", Integer),
        field("showInMinisite", Integer),
        field("requiredInMinisite", Integer),
        field("showInIaAgent", Integer),
        field("requiredInIaAgent", Integer),
    ],
};

pub static TIME_BLOCK: Entity = Entity {
    name: "time_block",
    tracked_fields: &[
        field("name", String),
        field("startTime", String),
        field("endTime", String),
        field("locationId", String),
        field("repetition", NullableObject),
        field("providers", StringArray),
    ],
};

/// Every event a webhook can subscribe to, in the order the reference lists them.
pub static EVENTS: [EventType; 15] = [
    EventType {
        name: "booking.created",
        entity: &BOOKING,
    },
    EventType {
        name: "booking.updated",
        entity: &BOOKING,
    },
    EventType {
        name: "booking.deleted",
        entity: &BOOKING,
    },
    EventType {
        name: "booking.status.updated",
        entity: &BOOKING,
    },
    EventType {
        name: "client.created",
        entity: &CLIENT,
    },
    EventType {
        name: "client.updated",
        entity: &CLIENT,
    },
    EventType {
        name: "client.deleted",
        entity: &CLIENT,
    },
    EventType {
        name: "service.updated",
        entity: &SERVICE,
    },
    EventType {
        name: "person.updated",
        entity: &PERSON,
    },
    EventType {
        name: "person.deleted",
        entity: &PERSON,
    },
    EventType {
        name: "custom_field.updated",
        entity: &CUSTOM_FIELD,
    },
    EventType {
        name: "custom_field.deleted",
        entity: &CUSTOM_FIELD,
    },
    EventType {
        name: "time_block.created",
        entity: &TIME_BLOCK,
    },
    EventType {
        name: "time_block.updated",
        entity: &TIME_BLOCK,
    },
    EventType {
        name: "time_block.deleted",
        entity: &TIME_BLOCK,
    },
];

/// Looks up a documented event by its exact name.
pub fn find_event(name: &str) -> Option<&'static EventType> {
    EVENTS.iter().find(|event| event.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_lists_fifteen_distinct_events() {
        let mut names: Vec<_> = EVENTS.iter().map(|e| e.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 15);
    }

    #[test]
    fn event_prefix_matches_entity() {
        for event in &EVENTS {
            assert!(
                event.name.starts_with(&format!("{}.", event.entity.name)),
                "{} is filed under {}",
                event.name,
                event.entity.name
            );
        }
    }

    #[test]
    fn booking_tracks_payment_status_under_snapshot_key() {
        let field = BOOKING
            .tracked_fields
            .iter()
            .find(|f| f.name == "paymentStatus")
            .expect("paymentStatus is tracked");
        assert_eq!(field.snapshot_key, "payment_status");
    }
}
