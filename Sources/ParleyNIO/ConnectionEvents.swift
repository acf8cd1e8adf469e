import ParleyWire

/// What the connection handler hands to the async layer after the handshake.
public enum ConnectionEvent: Sendable {
    case message(WireMessage)
    /// Nucleus fields the server sent after SERVER_IDENT.
    case notice(Parley_V1_Nucleus)
    /// A KEEPALIVE we sent came back (the timestamp we sent).
    case keepaliveAck(UInt64)
}

/// What the async layer asks the connection handler to send.
public enum ConnectionCommand: Sendable {
    case message(WireMessage)
    case notice(Parley_V1_Nucleus)
    case keepalive(UInt64)
    /// Send CLOSE with this status; the connection is closed once it has been written.
    case close(ParleyError)
}
