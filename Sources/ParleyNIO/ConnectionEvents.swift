import ParleyWire

/// What the connection handler hands to the async layer after the handshake.
public enum ConnectionEvent: Sendable {
    case message(WireMessage)
    /// Nucleus fields the server sent after SERVER_IDENT.
    case notice(Parley_V1_Nucleus)
    /// A KEEPALIVE we sent came back after this many nanoseconds (an ACK matching none of the
    /// KEEPALIVEs sent is ignored and raises nothing).
    case keepaliveAck(roundTrip: Int64)
    /// Server side: a DIRECT request (docs/protocol.md 7.16), its id admitted as in flight
    /// until a `directAnswer` with that id is written.
    case direct(DirectInbound)
    /// Server side: the answer to a DIRECT request in flight was handed to the channel, and
    /// its id is no longer in flight; `started` is what its `directAnswer` carried. A second
    /// answer to the same id (a service's mistake) is dropped and raises nothing, so that
    /// the connection's count of requests in flight (what a drain waits for) and of requests
    /// handled stay right.
    case directAnswered(started: ContinuousClock.Instant?)
}

/// Client side: how a DIRECT request ends: the answer (segment 0 starts with the id; a large
/// segment 1 may be the reads it arrived in), or the reason the connection ended first (or
/// why it could not be sent). Called once, on the event loop.
public typealias DirectCompletion = @Sendable (Result<DirectInbound, ParleyError>) -> Void

/// What the async layer asks the connection handler to send.
public enum ConnectionCommand: Sendable {
    case message(WireMessage)
    case notice(Parley_V1_Nucleus)
    case keepalive(UInt64)
    /// Send CLOSE with this status; the connection is closed once it has been written.
    case close(ParleyError)
    /// Server side: a service takes DIRECT requests on this connection from now on (fails
    /// without feature bit 4 or in a lossless session).
    case enableDirect
    /// Server side: the answer to the DIRECT request with the frame's id; `started` (when
    /// the request was received, if handlers are timed) comes back in `directAnswered`.
    case directAnswer(DirectFrame, started: ContinuousClock.Instant?)
    /// Client side: a DIRECT request; the connection gives it its id (the frame's is
    /// overwritten) and calls `completion` with the answer.
    case directRequest(DirectFrame, DirectCompletion)
}

/// Fired as an inbound user event by a transport that protects and authenticates the
/// connection itself (TLS), once its own handshake has completed and before any Parley byte
/// is read. The connection handler remembers it: the `tls` authentication method takes the
/// peer's entity name from it.
public struct TransportSecurityEvent: Sendable, Hashable {
    /// For example "TLSv1.3".
    public var protocolName: String
    /// The entity name of the peer's verified certificate (its subject's common name), or nil
    /// when the peer presented none (server-only TLS seen from the server).
    public var peerEntity: String?

    public init(protocolName: String, peerEntity: String?) {
        self.protocolName = protocolName
        self.peerEntity = peerEntity
    }
}
