//! AMQP 0.9.1 frames (specification §2.3.5, §4.2.3): our own frame layer around `amq-protocol`'s
//! method and content-header codec.
//!
//! Why not `amq_protocol::frame::parse_frame` whole: it would buffer a frame of any announced
//! size before looking at it, and it copies a body frame byte by byte into a `Vec`. Here the
//! 7-byte frame header is read first and a frame larger than the negotiated `frame_max` is
//! refused before anything is buffered (501 FRAME_ERROR, as the MQTT codec refuses an
//! oversized packet); a body is a slice of the read buffer. Methods and content headers — the
//! part with 70 method layouts and property flags — are `amq-protocol`'s, the codec under
//! lapin, so our server and the clients it is tested with read the same grammar. The hot
//! outgoing frames (`basic.deliver`, `basic.get-ok`, content header, body) are written here
//! directly into the connection's write buffer; every other method goes through
//! `amq-protocol`'s generator.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::basic::{AMQPProperties, gen_properties};
use amq_protocol::protocol::{AMQPClass, parse_class};
use bytes::{Buf, Bytes, BytesMut};

/// What a client sends first (AMQP 0.9.1), and what a server answers to a wrong one.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size before a frame's payload, and the end octet after it.
pub const FRAME_OVERHEAD: u32 = 8;
/// The smallest `frame_max` a peer may ask for (specification: frame-min-size).
pub const FRAME_MIN_SIZE: u32 = 4096;
/// The class of `basic` (content-bearing methods).
const CLASS_BASIC: u16 = 60;

/// One frame from a client.
#[derive(Debug)]
pub enum Frame {
    Method(u16, Box<AMQPClass>),
    Header(u16, Box<ContentHeader>),
    Body(u16, Bytes),
    Heartbeat,
}

/// A content header: the body's size and its properties.
#[derive(Debug)]
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    pub properties: AMQPProperties,
}

/// A frame that cannot be read; the connection closes with [`FrameError::reply_code`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a frame of {size} bytes exceeds the negotiated frame_max of {max}")]
    TooLarge { size: u64, max: u32 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("the frame does not end with 0xCE (found {0:#04x})")]
    BadEnd(u8),
    #[error("malformed method frame")]
    BadMethod,
    #[error("malformed content header")]
    BadHeader,
    #[error("a heartbeat on channel {0} (heartbeats belong to channel 0)")]
    HeartbeatChannel(u16),
}

impl FrameError {
    /// The AMQP reply code the connection is closed with: 501 FRAME_ERROR, 502 SYNTAX_ERROR.
    pub fn reply_code(&self) -> u16 {
        match self {
            FrameError::BadMethod | FrameError::BadHeader => 502,
            _ => 501,
        }
    }
}

/// The next whole frame in `buf`, if it holds one; its size is checked against `frame_max`
/// from the 7-byte header, before the frame is buffered.
pub fn decode(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, FrameError> {
    let Some(head) = buf.get(..7) else {
        return Ok(None);
    };
    let kind = head.first().copied().unwrap_or(0);
    let channel = u16::from_be_bytes([byte(head, 1), byte(head, 2)]);
    let size = u32::from_be_bytes([byte(head, 3), byte(head, 4), byte(head, 5), byte(head, 6)]);
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(FrameError::UnknownType(kind));
    }
    let total = u64::from(size) + u64::from(FRAME_OVERHEAD);
    if total > u64::from(frame_max) {
        return Err(FrameError::TooLarge {
            size: total,
            max: frame_max,
        });
    }
    let total = total as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let end = buf.get(total - 1).copied().unwrap_or(0);
    if end != FRAME_END {
        return Err(FrameError::BadEnd(end));
    }
    let mut frame = buf.split_to(total);
    frame.advance(7);
    frame.truncate(size as usize);
    match kind {
        FRAME_METHOD => match parse_class(&frame[..]) {
            Ok(([], class)) => Ok(Some(Frame::Method(channel, Box::new(class)))),
            _ => Err(FrameError::BadMethod),
        },
        FRAME_HEADER => parse_header(&frame).map(|h| Some(Frame::Header(channel, Box::new(h)))),
        FRAME_BODY => Ok(Some(Frame::Body(channel, frame.freeze()))),
        _ if channel != 0 => Err(FrameError::HeartbeatChannel(channel)),
        _ => Ok(Some(Frame::Heartbeat)),
    }
}

fn byte(slice: &[u8], at: usize) -> u8 {
    slice.get(at).copied().unwrap_or(0)
}

fn parse_header(payload: &[u8]) -> Result<ContentHeader, FrameError> {
    let Some((fixed, properties)) = payload.split_at_checked(12) else {
        return Err(FrameError::BadHeader);
    };
    let class_id = u16::from_be_bytes([byte(fixed, 0), byte(fixed, 1)]);
    let mut size = [0u8; 8];
    size.copy_from_slice(fixed.get(4..12).ok_or(FrameError::BadHeader)?);
    match amq_protocol::protocol::basic::parse_properties(properties) {
        Ok(([], properties)) => Ok(ContentHeader {
            class_id,
            body_size: u64::from_be_bytes(size),
            properties,
        }),
        _ => Err(FrameError::BadHeader),
    }
}

/// Appends a method frame (any method: `amq-protocol`'s generator).
pub fn write_method(out: &mut Vec<u8>, channel: u16, class: AMQPClass) {
    let frame = AMQPFrame::Method(channel, class);
    match gen_frame(&frame)(WriteContext::from(Vec::with_capacity(64))) {
        Ok(ctx) => out.extend_from_slice(&ctx.write),
        // Only a value that breaks the grammar (a string over 255 bytes) fails: never ours.
        Err(e) => tracing::error!(error = %e, "an AMQP method could not be encoded"),
    }
}

/// Appends a heartbeat frame.
pub fn write_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// A publisher confirm (`basic.ack`, or `basic.nack` without requeue) of publish `tag`,
/// written directly: one per confirmed publish, so it is on the hot path.
pub fn write_confirm(out: &mut Vec<u8>, channel: u16, tag: u64, ack: bool) {
    let start = begin_frame(out, FRAME_METHOD, channel);
    out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    out.extend_from_slice(&(if ack { 80u16 } else { 120u16 }).to_be_bytes());
    out.extend_from_slice(&tag.to_be_bytes());
    // `multiple` (and for a nack `requeue`): off.
    out.push(0);
    end_frame(out, start);
}

/// Where a message delivered to a consumer came from: `basic.deliver` or `basic.get-ok`.
#[derive(Debug, Clone, Copy)]
pub enum DeliveryMethod<'a> {
    Deliver { consumer_tag: &'a str },
    GetOk { message_count: u32 },
}

/// A message for a consumer: the method, the content header and the body in frames of at most
/// `frame_max`. `exchange`, `routing_key` and `consumer_tag` must be at most 255 bytes.
#[expect(
    clippy::too_many_arguments,
    reason = "the fields of the frames, in wire order"
)]
pub fn write_delivery(
    out: &mut Vec<u8>,
    channel: u16,
    method: DeliveryMethod<'_>,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    properties: &AMQPProperties,
    body: &[u8],
    frame_max: u32,
) {
    // The method frame.
    let start = begin_frame(out, FRAME_METHOD, channel);
    out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    match method {
        DeliveryMethod::Deliver { consumer_tag } => {
            out.extend_from_slice(&60u16.to_be_bytes());
            short_string(out, consumer_tag);
            out.extend_from_slice(&delivery_tag.to_be_bytes());
            out.push(u8::from(redelivered));
            short_string(out, exchange);
            short_string(out, routing_key);
        }
        DeliveryMethod::GetOk { message_count } => {
            out.extend_from_slice(&71u16.to_be_bytes());
            out.extend_from_slice(&delivery_tag.to_be_bytes());
            out.push(u8::from(redelivered));
            short_string(out, exchange);
            short_string(out, routing_key);
            out.extend_from_slice(&message_count.to_be_bytes());
        }
    }
    end_frame(out, start);
    // The content header.
    let start = begin_frame(out, FRAME_HEADER, channel);
    out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    if properties.bitmask() == 0 {
        out.extend_from_slice(&0u16.to_be_bytes());
    } else {
        match gen_properties(properties)(WriteContext::from(Vec::with_capacity(64))) {
            Ok(ctx) => out.extend_from_slice(&ctx.write),
            Err(e) => {
                tracing::error!(error = %e, "AMQP properties could not be encoded");
                out.extend_from_slice(&0u16.to_be_bytes());
            }
        }
    }
    end_frame(out, start);
    // The body, in frames of at most frame_max.
    let chunk = (frame_max.saturating_sub(FRAME_OVERHEAD)).max(1) as usize;
    for part in body.chunks(chunk) {
        let start = begin_frame(out, FRAME_BODY, channel);
        out.extend_from_slice(part);
        end_frame(out, start);
    }
}

fn begin_frame(out: &mut Vec<u8>, kind: u8, channel: u16) -> usize {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    at
}

fn end_frame(out: &mut Vec<u8>, size_at: usize) {
    let size = (out.len() - size_at - 4) as u32;
    if let Some(slot) = out.get_mut(size_at..size_at + 4) {
        slot.copy_from_slice(&size.to_be_bytes());
    }
    out.push(FRAME_END);
}

fn short_string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(bytes.get(..len).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use amq_protocol::frame::parse_frame;
    use amq_protocol::protocol::{basic, channel};

    use super::*;

    fn encoded(class: AMQPClass) -> Vec<u8> {
        let mut out = Vec::new();
        write_method(&mut out, 3, class);
        out
    }

    #[test]
    fn a_method_frame_round_trips() {
        let bytes = encoded(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )));
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = decode(&mut buf, 4096).unwrap().unwrap();
        assert!(
            matches!(frame, Frame::Method(3, c) if matches!(*c, AMQPClass::Channel(channel::AMQPMethod::Open(_))))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_frame_waits_and_an_oversized_one_is_refused_from_its_header() {
        let bytes = encoded(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )));
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert!(decode(&mut buf, 4096).unwrap().is_none());
        // Only the header of a frame announcing 1 MiB: refused before the body arrives.
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0, 0x10, 0, 0][..]);
        assert_eq!(
            decode(&mut buf, 131_072).unwrap_err(),
            FrameError::TooLarge {
                size: 0x10_0000 + 8,
                max: 131_072
            }
        );
    }

    #[test]
    fn a_bad_end_octet_an_unknown_type_and_a_garbled_method_are_errors() {
        let mut bytes = encoded(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )));
        let last = bytes.len() - 1;
        bytes[last] = 0;
        assert_eq!(
            decode(&mut BytesMut::from(&bytes[..]), 4096).unwrap_err(),
            FrameError::BadEnd(0)
        );
        assert_eq!(
            decode(
                &mut BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xCE][..]),
                4096
            )
            .unwrap_err(),
            FrameError::UnknownType(9)
        );
        let garbled = [FRAME_METHOD, 0, 1, 0, 0, 0, 4, 0, 99, 0, 99, FRAME_END];
        assert_eq!(
            decode(&mut BytesMut::from(&garbled[..]), 4096).unwrap_err(),
            FrameError::BadMethod
        );
    }

    #[test]
    fn a_confirm_is_what_amq_protocol_reads() {
        let mut out = Vec::new();
        write_confirm(&mut out, 7, 123_456_789, true);
        write_confirm(&mut out, 7, 42, false);
        let (rest, ack) = parse_frame(&out[..]).unwrap();
        assert_eq!(
            ack,
            AMQPFrame::Method(
                7,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: 123_456_789,
                    multiple: false
                }))
            )
        );
        let (rest, nack) = parse_frame(rest).unwrap();
        assert_eq!(
            nack,
            AMQPFrame::Method(
                7,
                AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: 42,
                    multiple: false,
                    requeue: false
                }))
            )
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn a_delivery_is_what_amq_protocol_reads() {
        let mut out = Vec::new();
        let properties = basic::AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let body = vec![7u8; 10_000];
        write_delivery(
            &mut out,
            5,
            DeliveryMethod::Deliver {
                consumer_tag: "ctag",
            },
            42,
            false,
            "amq.topic",
            "a.b",
            &properties,
            &body,
            4096,
        );
        let (rest, method) = parse_frame(&out[..]).unwrap();
        match method {
            AMQPFrame::Method(5, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                assert_eq!(d.consumer_tag.as_str(), "ctag");
                assert_eq!(d.delivery_tag, 42);
                assert_eq!(d.routing_key.as_str(), "a.b");
            }
            other => panic!("{other:?}"),
        }
        let (mut rest, header) = parse_frame(rest).unwrap();
        match header {
            AMQPFrame::Header(5, h) => {
                assert_eq!(h.body_size, 10_000);
                assert_eq!(h.properties, properties);
            }
            other => panic!("{other:?}"),
        }
        let mut received = Vec::new();
        while !rest.is_empty() {
            let (next, frame) = parse_frame(rest).unwrap();
            match frame {
                AMQPFrame::Body(5, part) => {
                    assert!(part.len() <= 4096 - 8);
                    received.extend(part);
                }
                other => panic!("{other:?}"),
            }
            rest = next;
        }
        assert_eq!(received, body);
        // Our own decoder reads the header back too.
        let mut buf = BytesMut::from(&out[..]);
        assert!(matches!(
            decode(&mut buf, 4096).unwrap(),
            Some(Frame::Method(..))
        ));
        match decode(&mut buf, 4096).unwrap() {
            Some(Frame::Header(5, h)) => assert_eq!(h.properties, properties),
            other => panic!("{other:?}"),
        }
    }
}
