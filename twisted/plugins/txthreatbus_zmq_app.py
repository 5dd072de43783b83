from twisted.application.service import ServiceMaker

zmqApp = ServiceMaker(
    "txthreatbus zmq-app",
    "txthreatbus.tap",
    "Threat Bus with the zmq-app plugin: apps join over ZeroMQ",
    "zmq-app",
)
