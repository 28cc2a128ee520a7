//! The node broker: sealed memfd regions for the pods on this node, over `broker.sock`.

mod books;
mod server;

pub use books::{
    Books, Grant, GrantGroup, InFlight, LabelSummary, Limits, NodeTotals, SessionId, Ticket,
};
pub use server::serve;
