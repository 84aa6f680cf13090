//! Methods the server sends, and the reply codes of AMQP 0.9.1 (specification §1.1 "Constants")
//! with RabbitMQ's way of writing their texts (`NOT_FOUND - no queue 'x' in vhost '/'`).

use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::ShortString;

use crate::amqp::codec;

pub const CONNECTION_FORCED: u16 = 320;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const PRECONDITION_FAILED: u16 = 406;
pub const FRAME_ERROR: u16 = 501;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;
pub const INTERNAL_ERROR: u16 = 541;

/// Appends a method frame.
pub fn method(out: &mut Vec<u8>, channel: u16, class: AMQPClass) {
    codec::write_method(out, channel, class);
}

/// A reply text as a short string (cut at 255 bytes, on a character boundary).
pub fn text(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(s.get(..end).unwrap_or_default()).unwrap_or_default()
}

/// `connection.close`: the connection ends (a hard error, a refusal or shutdown).
pub fn connection_close(
    out: &mut Vec<u8>,
    code: u16,
    reply_text: &str,
    class: u16,
    method_id: u16,
) {
    method(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: code,
            reply_text: text(reply_text),
            class_id: class,
            method_id,
        })),
    );
}

/// `channel.close`: the channel ends (a soft error), the connection stays.
pub fn channel_close(
    out: &mut Vec<u8>,
    id: u16,
    code: u16,
    reply_text: &str,
    class: u16,
    method_id: u16,
) {
    method(
        out,
        id,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: code,
            reply_text: text(reply_text),
            class_id: class,
            method_id,
        })),
    );
}
