//! The boundary between the saga and the domain services, as a trait: production uses the HTTP
//! [`Downstream`] client, a simulation or a test puts in-memory services behind it.

use async_trait::async_trait;
use contracts::{
    Account, Delivery, DeliveryPatch, DeliveryUpsert, DroneReservation, DroneReservationRequest,
    LegRequest, Package, PackageUpsert, ThirdPartyLeg,
};

use crate::{CallError, Downstream};

/// The calls the Scheduler's saga steps and the Supervisor's compensations make to the Account,
/// Package, Drone and Delivery services (DESIGN §5).
///
/// Every write is idempotent on the caller-assigned id, and every failure says whether trying
/// again can help ([`CallError::Transient`]) or not ([`CallError::Permanent`]). An implementation
/// must keep the services' rules: a `PUT` creates once and later finds the same thing, a `DELETE`
/// is a compensation that succeeds on what is already gone, and what a `DELETE` removed (or
/// pre-empted, for an id not created yet) is never created by a later `PUT`.
#[async_trait]
pub trait Domain: Send + Sync {
    /// Reads an account. A suspended account is data, not an error; an unknown one is `Permanent`
    /// with code `not-found`.
    async fn account(&self, id: &str) -> Result<Account, CallError>;

    /// Registers the package, or finds the same one already there. Different content under the
    /// same id is `Permanent` with code `package-conflict`; an id cancelled before it was
    /// registered is `Permanent` with code `package-cancelled`.
    async fn put_package(&self, id: &str, body: &PackageUpsert) -> Result<Package, CallError>;

    /// Cancels the package. Idempotent; an unknown package counts as done.
    async fn delete_package(&self, id: &str) -> Result<(), CallError>;

    /// Books a carrier leg for the delivery, or finds the same one already there. No carrier with
    /// capacity left is `Transient` with the service's `Retry-After`; an id whose leg was cancelled
    /// (or cancelled before it was booked) is `Permanent` with code `leg-cancelled`.
    async fn arrange_leg(
        &self,
        delivery_id: &str,
        body: &LegRequest,
    ) -> Result<ThirdPartyLeg, CallError>;

    /// Cancels the delivery's carrier leg. Idempotent; an unknown leg counts as done, and the id
    /// is refused by a later `arrange_leg`.
    async fn cancel_leg(&self, delivery_id: &str) -> Result<(), CallError>;

    /// Reserves a drone for the delivery's window; the same delivery keeps the same drone (a
    /// different pickup time moves the window). No free drone is `Transient` with the service's
    /// `Retry-After`; a released reservation is `Permanent` with code `reservation-released`.
    async fn reserve_drone(
        &self,
        delivery_id: &str,
        body: &DroneReservationRequest,
    ) -> Result<DroneReservation, CallError>;

    /// Releases the drone. Idempotent; an unknown reservation counts as done.
    async fn release_drone(&self, delivery_id: &str) -> Result<(), CallError>;

    /// Creates the delivery, or finds it already there. An id cancelled before it was created is
    /// `Permanent` with code `delivery-cancelled`.
    async fn put_delivery(&self, id: &str, body: &DeliveryUpsert) -> Result<(), CallError>;

    /// Reschedules the delivery. An unknown delivery is `Permanent` with code `not-found`; a
    /// completed or cancelled one `Permanent` with code `delivery-closed`.
    async fn reschedule_delivery(
        &self,
        id: &str,
        body: &DeliveryPatch,
    ) -> Result<Delivery, CallError>;

    /// Cancels the delivery. Idempotent; an unknown delivery counts as done; a completed one is
    /// `Permanent` with code `delivery-closed`.
    async fn cancel_delivery(&self, id: &str) -> Result<(), CallError>;

    /// The circuit breaker and concurrency cap in front of each service, as they are now; none
    /// for an implementation without them (an in-memory stand-in).
    fn breakers(&self) -> Vec<contracts::BreakerStatus> {
        Vec::new()
    }
}

#[async_trait]
impl Domain for Downstream {
    async fn account(&self, id: &str) -> Result<Account, CallError> {
        Downstream::account(self, id).await
    }

    async fn put_package(&self, id: &str, body: &PackageUpsert) -> Result<Package, CallError> {
        Downstream::put_package(self, id, body).await
    }

    async fn delete_package(&self, id: &str) -> Result<(), CallError> {
        Downstream::delete_package(self, id).await
    }

    async fn arrange_leg(
        &self,
        delivery_id: &str,
        body: &LegRequest,
    ) -> Result<ThirdPartyLeg, CallError> {
        Downstream::arrange_leg(self, delivery_id, body).await
    }

    async fn cancel_leg(&self, delivery_id: &str) -> Result<(), CallError> {
        Downstream::cancel_leg(self, delivery_id).await
    }

    async fn reserve_drone(
        &self,
        delivery_id: &str,
        body: &DroneReservationRequest,
    ) -> Result<DroneReservation, CallError> {
        Downstream::reserve_drone(self, delivery_id, body).await
    }

    async fn release_drone(&self, delivery_id: &str) -> Result<(), CallError> {
        Downstream::release_drone(self, delivery_id).await
    }

    async fn put_delivery(&self, id: &str, body: &DeliveryUpsert) -> Result<(), CallError> {
        Downstream::put_delivery(self, id, body).await
    }

    async fn reschedule_delivery(
        &self,
        id: &str,
        body: &DeliveryPatch,
    ) -> Result<Delivery, CallError> {
        Downstream::reschedule_delivery(self, id, body).await
    }

    async fn cancel_delivery(&self, id: &str) -> Result<(), CallError> {
        Downstream::cancel_delivery(self, id).await
    }

    fn breakers(&self) -> Vec<contracts::BreakerStatus> {
        Downstream::breakers(self)
    }
}
